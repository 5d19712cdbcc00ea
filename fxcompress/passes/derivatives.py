"""Factor an activation's derivative out of the backward, so that it is saved in place of the input.

An elementwise activation's backward is linear in its gradient: ``g * f'(x)``.
Computed from a lossy code of ``x``, the derivative moves by up to
``|f''| dx``, and where ``f'`` steps (hard-swish at -3 and 3) by the whole
step; computed in the forward from the exact ``x`` and coded itself, it moves
by its own code's error, bounded as ``f'`` is. :func:`factor_derivatives`
finds each backward expression that is the gradient times a factor computed
from saved tensors alone, and rewrites it as one product, so that
``save_predicates`` saves the factor (its forward computes it) and the saved
input is no longer read. SiLU, as Inductor's decompositions write its
backward::

    before:  s = sigmoid(x);  a = g * s;  b = a * (1 + x * (1 - s))
    after:   d = sigmoid(x) * (1 + x * (1 - sigmoid(x)))      saved from the forward
             b = g * d

The same on the eager backend's ops: ``silu_backward(g, x)`` is
``g * silu_backward(1, x)``. A hard-swish (``where(x <= -3, 0, where(x < 3,
g * (x / 3 + 0.5), g))``) factors through its selections.

What is factored: products with, quotients by, selections (``where`` with a
predicate of saved tensors) of, and sums and differences of, expressions
linear in one gradient node, whose factor is a nonlinear function of saved
tensors the size of the product, read as values (an affine factor, a
normalization's ``x̂``, is coded as well as its input; one read only through
comparisons keeps its 1-bit mask). Only where the saved tensors it reads are
then read by nothing else, and the factors are no larger than they: the
bytes saved never grow.

NB: the product's rounding differs from the original's (the factors are
multiplied first), and a gradient of ±inf where the derivative is 0 gives
NaN instead of 0; the codes approximate either way, and AMP's GradScaler
skips such a step.
"""
from __future__ import annotations

import operator
from typing import Union

import torch
import torch.fx as fx

from ..codecs.uses import VIEW_OPS
from .splice import call_node

__all__ = ["DERIVATIVE_OPS", "factor_derivatives"]

aten = torch.ops.aten

#: Backward ops ``op(g, x, ...)`` that are ``g * op(1, x, ...)`` (the eager backend's graphs):
#: their second argument a saved input or output. Hard-swish's is not tagged pointwise.
DERIVATIVE_OPS = frozenset({aten.silu_backward.default, aten.gelu_backward.default, aten.hardswish_backward.default,
                            aten.tanh_backward.default, aten.sigmoid_backward.default})
_CONSTANTS = frozenset({aten.full.default, aten.scalar_tensor.default})
# Ops that keep a factor affine in the saved tensors (with at most one operand that depends on them)
_AFFINE = frozenset({aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default,
                     aten.clone.default, aten._to_copy.default, torch.ops.prims.convert_element_type.default,
                     aten.var_mean.correction, aten.var.correction, operator.getitem})
_CAST = torch.ops.prims.convert_element_type.default
_COMPARES = frozenset({aten.le, aten.lt, aten.ge, aten.gt, aten.eq, aten.ne})

# A factor: ONE, ZERO, a graph node, or an op of factors: ("mul" | "div" | "add" | "sub", a, b),
# ("neg", a), ("where", predicate node, a, b), ("deriv", op, x, extra args)
Factor = Union[str, fx.Node, tuple]
ONE, ZERO = "one", "zero"


def factor_derivatives(bw: fx.GraphModule, storage: dict[fx.Node, fx.Node], computable: set[fx.Node],
                       encodable: set[fx.Node]) -> tuple[fx.GraphModule, frozenset[fx.Node]]:
    """``bw`` with each factorable derivative expression rewritten as ``g * factor``, and the factors'
    nodes (for ``save_predicates`` to save); ``bw`` itself and no nodes where there is none.

    ``storage`` maps each saved tensor's placeholder to the forward node whose storage it is (two
    placeholders of one storage: a tensor and its saved view); ``computable`` is what the forward
    could compute (``save_predicates``); ``encodable``, the saved placeholders a lossy codec may
    code. ``bw`` is changed in place: the caller passes a copy.
    """
    lin = _linear_forms(bw, computable)
    candidates = {n: form for n, form in lin.items() if _is_candidate(n, form, lin, computable, encodable)}
    candidates = _keep_where_inputs_die(bw, candidates, storage, computable, encodable)
    if not candidates:
        return bw, frozenset()
    factors = set()
    for node, (g, factor) in candidates.items():
        factors.add(_rewrite(bw.graph, node, g, factor, _saved_dtype(factor, computable, encodable)))
    bw.graph.eliminate_dead_code()
    bw.graph.lint()
    bw.recompile()
    return bw, frozenset(factors)


def _linear_forms(bw: fx.GraphModule, computable: set[fx.Node]) -> dict[fx.Node, tuple[fx.Node, Factor]]:
    """Each backward node that is ``g * factor`` for one non-computable node ``g`` and a factor of
    computable nodes: ``{node: (g, factor)}``. A node another reads too is a ``g`` of its own."""
    lin: dict[fx.Node, tuple[fx.Node, Factor]] = {}

    def form(a: object) -> tuple[fx.Node, Factor] | None:
        if not isinstance(a, fx.Node) or a in computable:
            return None
        return lin[a] if a in lin and len(a.users) == 1 else (a, ONE)

    for n in bw.graph.nodes:
        if n.op != "call_function" or n in computable or n.kwargs.get("alpha", 1) != 1:
            continue
        args, t = n.args, n.target
        if t in DERIVATIVE_OPS and (a := form(args[0])) and args[1] in computable:
            lin[n] = (a[0], ("mul", a[1], ("deriv", t, args[1], tuple(args[2:]))))
        elif t in (aten.mul.Tensor, aten.div.Tensor) and (a := form(args[0])) and _is_factor(args[1], computable):
            lin[n] = (a[0], ("mul" if t is aten.mul.Tensor else "div", a[1], args[1]))
        elif t is aten.mul.Tensor and (b := form(args[1])) and _is_factor(args[0], computable):
            lin[n] = (b[0], ("mul", b[1], args[0]))
        elif t is aten.neg.default and (a := form(args[0])):
            lin[n] = (a[0], ("neg", a[1]))
        elif t in (aten.add.Tensor, aten.sub.Tensor) and (a := form(args[0])) and (b := form(args[1])) \
                and a[0] is b[0]:
            lin[n] = (a[0], ("add" if t is aten.add.Tensor else "sub", a[1], b[1]))
        elif t is aten.where.self and args[0] in computable:
            branches = [_zero_or(form, x, computable) for x in args[1:]]
            gs = {b[0] for b in branches if b is not None and b[0] is not None}
            if None not in branches and len(gs) == 1:
                lin[n] = (gs.pop(), ("where", args[0], branches[0][1], branches[1][1]))
    return lin


def _is_factor(a: object, computable: set[fx.Node]) -> bool:
    return (isinstance(a, fx.Node) and a in computable) or (isinstance(a, (int, float)) and not isinstance(a, bool))


def _zero_or(form, a: object, computable: set[fx.Node]) -> tuple[fx.Node | None, Factor] | None:
    """A selection's branch as ``(g, factor)``: a zero constant is ``(None, ZERO)``."""
    if isinstance(a, fx.Node) and a in computable:
        zero = a.target in _CONSTANTS and a.args[-1] == 0 if a.op == "call_function" else False
        return (None, ZERO) if zero else None
    return form(a)


def _leaves(factor: Factor, values: bool = False) -> list[fx.Node]:
    """The graph nodes a factor reads (``values``: not the predicates of its selections)."""
    if isinstance(factor, fx.Node):
        return [factor]
    if not isinstance(factor, tuple):
        return []
    kind, *rest = factor
    if kind == "deriv":
        return [rest[1], *[a for a in rest[2] if isinstance(a, fx.Node)]]
    if kind == "where" and values:
        rest = rest[1:]
    return [x for part in rest for x in _leaves(part, values)]


def _cone(leaves: list[fx.Node], computable: set[fx.Node], saved: set[fx.Node]) -> set[fx.Node]:
    seen, todo = set(), list(leaves)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            if n not in saved:
                todo.extend(i for i in n.all_input_nodes if i in computable)
    return seen


def _is_candidate(node: fx.Node, form: tuple[fx.Node, Factor], lin: dict, computable: set[fx.Node],
                  encodable: set[fx.Node]) -> bool:
    """The outermost node of its expression, whose factor is a nonlinear function, read as values, of
    saved tensors a lossy codec may code, each the product's size."""
    if any(u in lin and lin[u][0] is form[0] and len(node.users) == 1 for u in node.users):
        return False  # NB: a user extends it
    cone = _cone(_leaves(form[1]), computable, encodable)
    saved = cone & encodable
    numel = node.meta["val"].numel()
    if any(s.meta["val"].numel() != numel for s in saved):
        return False
    # NB: read as values: a factor of selections between constants (ReLU's) is the saved tensors'
    # predicates alone, which their 1-bit masks keep exact
    if not _cone(_leaves(form[1], values=True), computable, encodable) & saved:
        return False
    return _nonlinear(form[1], cone, saved)


def _nonlinear(factor: Factor, cone: set[fx.Node], saved: set[fx.Node]) -> bool:
    """Whether ``factor`` is more than an affine function of ``saved`` (or a selection by predicates
    of it alone): a nonlinear op of it, a product of two factors that read it, or a selection by a
    predicate of it between factors of which one reads it."""
    depends: set[fx.Node] = set()
    for n in _topological(cone):
        if n in saved or any(i in depends for i in n.all_input_nodes):
            depends.add(n)
            if n not in saved and _nonlinear_node(n, depends):
                return True

    def reads(f: Factor) -> bool:
        return any(x in depends for x in _leaves(f))

    def walk(f: Factor) -> bool:
        if not isinstance(f, tuple):
            return False
        kind, *rest = f
        if kind == "deriv":
            return rest[1] in depends
        if kind == "where":
            return (rest[0] in depends and (reads(rest[1]) or reads(rest[2]))) or walk(rest[1]) or walk(rest[2])
        if kind in ("mul", "div") and reads(rest[0]) and reads(rest[1]):
            return True
        return any(walk(part) for part in rest)

    return walk(factor)


def _nonlinear_node(n: fx.Node, depends: set[fx.Node]) -> bool:
    target = n.target
    if getattr(target, "overloadpacket", None) in _COMPARES or target in VIEW_OPS or target in _CONSTANTS:
        return False
    tensors = [a for a in n.args if isinstance(a, fx.Node)]
    if target is aten.where.self:
        return n.args[0] in depends and any(a in depends for a in n.args[1:])
    if target is aten.mul.Tensor:
        return sum(a in depends for a in tensors) > 1
    if target is aten.div.Tensor:
        return len(n.args) > 1 and n.args[1] in depends
    return target not in _AFFINE


def _topological(nodes: set[fx.Node]) -> list[fx.Node]:
    if not nodes:
        return []
    order = {n: i for i, n in enumerate(next(iter(nodes)).graph.nodes)}
    return sorted(nodes, key=order.__getitem__)


def _keep_where_inputs_die(bw: fx.GraphModule, candidates: dict, storage: dict[fx.Node, fx.Node],
                           computable: set[fx.Node], encodable: set[fx.Node]) -> dict:
    """The candidates after whose rewrite each saved storage their factors read is read by nothing
    else in the backward (through any of its placeholders), and whose factors are no larger than
    the storages they free (counted per group of candidates that read the same ones)."""
    reads = {n: {storage[s] for s in _cone(_leaves(f), computable, encodable) & encodable}
             for n, (_, f) in candidates.items()}
    while candidates:
        alive = {storage[n] for n in _alive(bw, {n: g for n, (g, _) in candidates.items()}) if n in storage}
        keep = {n: form for n, form in candidates.items() if not (reads[n] & alive)}
        for group in _groups(list(keep), reads):
            freed = set().union(*(reads[n] for n in group))
            added = sum(n.meta["val"].numel() * max(r.meta["val"].element_size() for r in reads[n]) for n in group)
            if added > sum(r.meta["val"].untyped_storage().nbytes() for r in freed):
                for n in group:  # NB: more factors than inputs (one input, two activations): the inputs stay
                    del keep[n]
        if keep.keys() == candidates.keys():
            break
        candidates = keep
    return candidates


def _groups(nodes: list[fx.Node], reads: dict[fx.Node, set[fx.Node]]) -> list[list[fx.Node]]:
    """``nodes`` grouped so that two that read a saved tensor in common are in one group."""
    groups: list[tuple[set[fx.Node], list[fx.Node]]] = []
    for n in nodes:
        touching = [g for g in groups if g[0] & reads[n]]
        merged = (set(reads[n]).union(*(g[0] for g in touching)), [m for g in touching for m in g[1]] + [n])
        groups = [g for g in groups if not any(g is t for t in touching)] + [merged]
    return [members for _, members in groups]


def _alive(bw: fx.GraphModule, replaced: dict[fx.Node, fx.Node]) -> set[fx.Node]:
    """The nodes the backward's outputs need once each node of ``replaced`` reads only its
    gradient (its factor then comes saved)."""
    seen, todo = set(), [bw.graph.output_node()]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend([replaced[n]] if n in replaced else n.all_input_nodes)
    return seen


def _saved_dtype(factor: Factor, computable: set[fx.Node], encodable: set[fx.Node]) -> torch.dtype:
    """The widest dtype of the saved tensors the factor reads: the factor is saved in it."""
    saved = _cone(_leaves(factor), computable, encodable) & encodable
    return max((s.meta["val"].dtype for s in saved), key=lambda d: torch.finfo(d).bits)


def _rewrite(graph: fx.Graph, node: fx.Node, g: fx.Node, factor: Factor, dtype: torch.dtype) -> fx.Node:
    """Replace ``node`` by ``g * factor``; return the factor's node."""
    val = node.meta["val"]
    mode = val.fake_mode
    tag = {"role": "derivative", "of": node.name}

    def call(target, *args, **kwargs) -> fx.Node:
        return call_node(graph, target, args, kwargs, fake_mode=mode, tag=tag)

    def const(value: float) -> fx.Node:
        return call(aten.full.default, [], value, dtype=val.dtype, device=val.device)

    def build(f: Factor) -> fx.Node | None:  # None: ONE
        if f == ONE:
            return None
        if f == ZERO:
            return const(0.0)
        if isinstance(f, fx.Node):
            return f
        kind, *rest = f
        if kind == "deriv":  # NB: full-size: oneDNN's gelu_backward cannot broadcast a 0-d gradient
            op, x, extra = rest
            one = call(aten.full.default, list(x.meta["val"].shape), 1.0, dtype=x.meta["val"].dtype,
                       device=x.meta["val"].device)
            return call(op, one, x, *extra)
        if kind == "neg":
            a = build(rest[0])
            return call(aten.neg.default, const(1.0) if a is None else a)
        if kind == "where":
            a, b = (const(1.0) if x is None else x for x in map(build, rest[1:]))
            return call(aten.where.self, rest[0], a, b)
        a = build(rest[0])
        if kind in ("add", "sub"):
            b = build(rest[1])
            return call(aten.add.Tensor if kind == "add" else aten.sub.Tensor,
                        *(const(1.0) if x is None else x for x in (a, b)))
        other = build(rest[1]) if isinstance(rest[1], (tuple, str)) else rest[1]  # or a node, a number
        if kind == "div":
            return call(aten.div.Tensor, const(1.0) if a is None else a, other)
        if a is None:
            return other if isinstance(other, fx.Node) else const(float(other))
        return call(aten.mul.Tensor, a, other)

    with graph.inserting_before(node):
        d = build(factor)  # NB: never ONE: a candidate's factor reads a saved tensor
        # NB: prims' cast, not aten._to_copy: Inductor lowers graphs after its decompositions, which
        # have no _to_copy left
        if d.meta["val"].dtype != dtype:
            d = call(_CAST, d, dtype)
        product = call(aten.mul.Tensor, g, d)
        if product.meta["val"].dtype != val.dtype:
            product = call(_CAST, product, val.dtype)
    node.replace_all_uses_with(product)
    return d
