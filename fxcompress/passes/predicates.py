"""Save the comparisons the backward makes of values it recomputes, so that lossy codecs keep masks exact.

Inductor's partitioner (min-cut) recomputes cheap elementwise values in the
backward instead of saving them. A batch-norm then a ReLU6 whose output no
other op needs: the backward recomputes the batch-norm output from the saved
convolution output and compares it::

    bw:  bn    = (convolution - mean) * rstd * w + b       recomputed
         mask  = le(bn, 0) | ge(bn, 6)
         grad  = where(mask, 0, g)

Under a lossy codec ``convolution`` decodes to nearby values, and ``mask``
would flip where ``bn`` lies near 0 or 6: such an element's gradient passes
whole or is dropped, an error no codec bound covers (a ReLU's, a leaky ReLU's,
a hardtanh's mask alike). :func:`save_predicates` moves each such comparison
into the forward, where the values are exact, and saves its bool result
(:class:`~fxcompress.codecs.lossless.BitMask` stores 1 bit per element)::

    fw:  mask  = le(bn', 0) | ge(bn', 6)                   saved
    bw:  grad  = where(mask, 0, g)

Where min-cut recomputes the batch-norm's statistics as well (a ``var_mean``
of the saved convolution output, as it does for small feature maps), the
comparison moves with them: the forward's own ``var_mean`` computes it, none
is added.

A divisor that broadcasts (a normalizer: a linear attention's ``q . sum(k) +
eps``) recomputed from such values is saved the same way, exact: an error of
a step of its group's range in a divisor near ``eps`` moved the quotient's
gradients by many times their size (``uses`` keeps a saved one exact). And
where the backward recomputes a quotient by such a normalizer from a saved
numerator (``-g * (num / den) / den``), the quotient is saved instead: the
numerator's codes' error would grow by ``1 / den``, the quotient's (a linear
attention's output, a weighted mean of ``v``) stays in proportion to it.

A norm's input that the backward recomputes from saved tensors, at most half
the size of each (XCiT's class token: one row of a sum of two saved tensors,
normalized alone), is saved too, so that it is coded in the norm's space:
its row, small beside the rows it shared a group with, came back from their
codes with an error of its own size, and the norm's rstd multiplied it.

An activation's backward that is its gradient times a nonlinear function of
a saved input that nothing else reads (``g * f'(x)``: SiLU, GELU, hard-swish,
on either backend's ops) is rewritten so, and the derivative is saved in place
of ``x``: bounded, it is the better thing to code
(:func:`~fxcompress.passes.derivatives.factor_derivatives`).

A recomputation that other ops read as values stays in the backward (those
reads are the codec's approximation, with its bound). One comparison made
directly of a saved tensor is not moved: the codecs keep it exact in the
tensor's own code (``mask[...]``, ``+clamped``, ``+split``). Several are (a
hardtanh's ``le(x, 0) | ge(x, 6)`` of a saved batch-norm output, as
Inductor's decompositions write it): a code keeps one predicate.
"""
from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx

from ..codecs.uses import VIEW_OPS, is_normalizer, terminal_users, view_root
from ..ir import META_KEY, elementwise, graph_module, saved_pairs, target_name
from .derivatives import DERIVATIVE_OPS, factor_derivatives
from .splice import copy_node

__all__ = ["save_predicates"]

aten = torch.ops.aten

_COMPARES = frozenset({aten.le, aten.lt, aten.ge, aten.gt, aten.eq, aten.ne})
_CONSTANTS = frozenset({aten.full.default, aten.scalar_tensor.default})
# NB: a norm's statistics, which min-cut may recompute in the backward too (RegNetY's 2x2 maps at
# batch 2): a mask of a recomputed norm output is only movable with them.
_STATISTICS = frozenset({aten.var_mean.correction, aten.var.correction})


def save_predicates(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int
                    ) -> tuple[fx.GraphModule, fx.GraphModule]:
    """A forward that computes and saves each bool the backward derives from recomputed values
    (and each normalizer it divides by, each quotient by one, each small norm input it recomputes
    and each smooth activation's derivative), and a backward that reads it; ``fw`` and ``bw``
    themselves where there is none.

    The new saved tensors follow the others (AOTAutograd's calling convention).
    The graphs given are not changed; a saved tensor that the backward no longer
    reads stays saved, for the codec plan to store nothing of it.
    """
    bw, factors = _factor_derivatives(fw, bw, num_fwd_outputs)
    kinds = _masks(fw, bw, num_fwd_outputs, factors)
    if not kinds:
        return fw, bw
    fw, fw_of = _copy(fw)
    bw, bw_of = _copy(bw)
    masks = [bw_of[m] for m in kinds]
    outputs, tensors, placeholders = saved_pairs(fw, bw, num_fwd_outputs)
    source = dict(zip(placeholders, tensors, strict=True))
    computable = _forward_computable(bw, source)
    env: dict[fx.Node, fx.Node] = dict(source)
    for mask in masks:
        _copy_cone(fw.graph, mask, computable, env)
    last = placeholders[-1]
    for mask, kind in zip(masks, kinds.values(), strict=True):
        saved = env[mask]  # NB: a new dict: the forward's own node (reused) shares its meta's values with fw's
        saved.meta[META_KEY] = {**saved.meta.get(META_KEY, {}), "saved_by": "save_predicates", "saved_as": kind}
        with bw.graph.inserting_after(last):
            last = bw.graph.placeholder(f"{mask.name}_saved")
        last.meta["val"] = mask.meta["val"]
        mask.replace_all_uses_with(last)
    n_saved = num_fwd_outputs + len(tensors)
    fw.graph.output_node().args = (tuple(outputs[:n_saved] + [env[m] for m in masks] + outputs[n_saved:]),)
    bw.graph.eliminate_dead_code()
    for gm in (fw, bw):
        gm.graph.lint()
        gm.recompile()
    return fw, bw


def _masks(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int, factors: frozenset[fx.Node] = frozenset()
           ) -> dict[fx.Node, str]:
    """The backward's nodes to save, in its order, each with what it is (for the policy's reason). Its bools: computable in the forward, read by the backward's own work,
    and comparing a recomputed value of a tensor that a lossy codec may encode; and the
    normalizers it divides by (a divisor that broadcasts), recomputed from such a tensor, and its
    quotients by one of a saved tensor (or view of one) that a lossy codec may encode; and the
    norm inputs it recomputes from such tensors, where at most half the size of each."""
    source, fw_inputs = _sources(fw, bw, num_fwd_outputs)
    computable = _forward_computable(bw, source)

    def mask(n: fx.Node) -> bool:
        return (_is_bool(n) and any(u not in computable for u in n.users)
                and _compares_recomputed(n, computable, source, fw_inputs))

    def normalizer(n: fx.Node) -> bool:
        return (any(is_normalizer(n, u) for u in n.users)
                and _reads_encodable(_cone(n, computable, source), source, fw_inputs))

    def quotient(n: fx.Node) -> bool:
        numerator = n.args[0] if n.target is aten.div.Tensor else None
        return (isinstance(numerator, fx.Node) and view_root(numerator) in source and is_normalizer(n.args[1], n)
                and _reads_encodable({view_root(numerator)}, source, fw_inputs))

    def small_norm_input(n: fx.Node) -> bool:
        # NB: XCiT's class-token norm: the sum of two saved tensors' rows, normalized with statistics
        # of that row alone; each row's codes shared a group with another row's, many times its size
        if view_root(n) in source or not any(_normalizes(n, u, source) for u in n.users):
            return False  # NB: first: the cone below is a walk of the graph, for the few that get here
        cone = _cone(n, computable, source)
        saved = [m for m in cone if m in source and view_root(source[m]) not in fw_inputs]
        return (_reads_encodable(cone, source, fw_inputs)
                and all(2 * n.meta["val"].numel() <= m.meta["val"].numel() for m in saved))

    def kind(n: fx.Node) -> str | None:
        if mask(n):
            return "a comparison the backward made of recomputed values"
        if normalizer(n):
            return "a normalizer the backward recomputed"
        if small_norm_input(n):
            return "a norm's input, which the backward recomputed, saved"
        if n in factors:
            return _derivative_kind(n)
        return "a quotient by a normalizer, saved in place of its numerator" if quotient(n) else None

    kinds = {n: k for n in bw.graph.nodes if n in computable and n not in source and (k := kind(n))}
    quotients = {n for n, k in kinds.items() if k.startswith("a quotient")}
    # NB: only where nothing else reads the numerator, which then stores nothing: beside it, the
    # quotient's codes would add memory
    def numerator_unread(q: fx.Node) -> bool:
        return set(terminal_users(view_root(q.args[0]))) <= kinds.keys()

    while not all(map(numerator_unread, quotients)):
        dropped = {q for q in quotients if not numerator_unread(q)}
        quotients -= dropped
        for q in dropped:
            del kinds[q]
    return kinds


def _derivative_kind(factor: fx.Node) -> str:
    if factor.target in (aten.tanh_backward.default, aten.sigmoid_backward.default):
        return f"{target_name(factor).removesuffix('_backward')}'s derivative, saved in place of its output"
    if factor.target in DERIVATIVE_OPS:
        return f"{target_name(factor).removesuffix('_backward')}'s derivative, saved in place of its input"
    return "an activation's derivative, saved in place of its input"


def _sources(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int
             ) -> tuple[dict[fx.Node, fx.Node], frozenset[fx.Node]]:
    """Each saved tensor's backward placeholder mapped to its forward node, and the forward's inputs."""
    _, tensors, placeholders = saved_pairs(fw, bw, num_fwd_outputs)
    return dict(zip(placeholders, tensors, strict=True)), frozenset(fw.graph.find_nodes(op="placeholder"))


def _normalizes(x: fx.Node, user: fx.Node, source: dict[fx.Node, fx.Node]) -> bool:
    """Whether ``user`` is ``x - mean`` with ``mean`` a saved norm statistic (a ``var_mean``'s)."""
    mean = user.args[1] if user.target is aten.sub.Tensor and user.args[0] is x else None
    stat = source.get(mean) if isinstance(mean, fx.Node) else None
    return (stat is not None and stat.target is operator.getitem
            and getattr(stat.args[0], "target", None) in _STATISTICS)


def _factor_derivatives(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int
                        ) -> tuple[fx.GraphModule, frozenset[fx.Node]]:
    """A copy of ``bw`` with its activations' derivatives factored out, and the factors' nodes
    (:func:`~fxcompress.passes.derivatives.factor_derivatives`); ``bw`` itself where there is none."""
    copy_, _ = _copy(bw)
    source, fw_inputs = _sources(fw, copy_, num_fwd_outputs)
    encodable = {p for p in source if _reads_encodable({p}, source, fw_inputs)}
    storage = {p: view_root(n) for p, n in source.items()}
    copy_, factors = factor_derivatives(copy_, storage, _forward_computable(copy_, source), encodable)
    return (copy_, factors) if factors else (bw, factors)


def _copy(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    """A copy of ``gm`` with its own graph, and each node's copy."""
    graph = copy.deepcopy(gm.graph)
    return graph_module(gm, graph), dict(zip(gm.graph.nodes, graph.nodes, strict=True))


def _forward_computable(bw: fx.GraphModule, source: dict[fx.Node, fx.Node]) -> set[fx.Node]:
    """Backward nodes the forward could compute: saved tensors and what elementwise ops, views,
    constants and normalization statistics make of them alone (nothing that reads a gradient)."""
    computable = set(source)
    for node in bw.graph.nodes:
        if node.op == "call_function" and _recomputable(node) and all(
            i in computable for i in node.all_input_nodes
        ):
            computable.add(node)
    return computable


def _recomputable(node: fx.Node) -> bool:
    target = node.target
    if target is operator.getitem:
        return getattr(node.args[0], "target", None) in _STATISTICS  # a statistic's mean or variance
    if not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable:
        return False
    if torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return (elementwise(node) or target in VIEW_OPS or target in _CONSTANTS or target in _STATISTICS
            or target in DERIVATIVE_OPS)


def _is_bool(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype == torch.bool


def _cone(node: fx.Node, computable: set[fx.Node], source: dict[fx.Node, fx.Node]) -> set[fx.Node]:
    """``node`` and its computable ancestors, saved tensors included."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n not in source:
            todo.extend(i for i in n.all_input_nodes if i in computable)
    return seen


def _compares_recomputed(
    mask: fx.Node, computable: set[fx.Node], source: dict[fx.Node, fx.Node], fw_inputs: frozenset[fx.Node]
) -> bool:
    """Whether ``mask`` is more than one comparison of a saved tensor (which the tensor's codec keeps
    exact) and compares values made from at least one saved floating-point tensor that a lossy codec
    may encode (not a graph input)."""
    if _compares(mask) and all(view_root(a) in source for a in mask.args if isinstance(a, fx.Node)):
        return False
    cone = _cone(mask, computable, source)
    return any(_compares(n) for n in cone) and _reads_encodable(cone, source, fw_inputs)


def _reads_encodable(cone: set[fx.Node], source: dict[fx.Node, fx.Node], fw_inputs: frozenset[fx.Node]) -> bool:
    """Whether ``cone`` holds a saved floating-point tensor that a lossy codec may encode (not a graph input)."""
    return any(n in source and n.meta["val"].is_floating_point() and view_root(source[n]) not in fw_inputs
               for n in cone)


def _compares(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "overloadpacket", None) in _COMPARES


def _copy_cone(graph: fx.Graph, mask: fx.Node, computable: set[fx.Node], env: dict[fx.Node, fx.Node]) -> None:
    """Copy what ``mask`` needs of the backward into the forward ``graph``, after the last forward
    node it reads (not at the end: the bool is encoded as soon as it exists)."""
    cone = _cone(mask, computable, {n: n for n in env})
    todo = [n for n in mask.graph.nodes if n in cone and n not in env]
    copies, fresh = [], set()
    for node in todo:
        same = None if any(i in fresh for i in node.all_input_nodes) else _same_in(graph, node, env)
        if same is not None:
            env[node] = same
        else:
            copies.append(node)
            fresh.add(node)
    order = {n: i for i, n in enumerate(graph.nodes)}
    inputs = [env[i] for n in copies for i in n.all_input_nodes if i not in fresh]
    anchor = max(inputs, key=order.__getitem__) if inputs else list(graph.find_nodes(op="placeholder"))[-1]
    for node in copies:
        with graph.inserting_after(anchor):
            anchor = env[node] = copy_node(graph, node, env, {"role": "predicate", "of": mask.name})


def _same_in(graph: fx.Graph, node: fx.Node, env: dict[fx.Node, fx.Node]) -> fx.Node | None:
    """The forward's own node computing what ``node`` does, if it has one (min-cut recomputes the
    forward's ops as they were: a batch-norm output is read again, not computed twice, and its
    pattern stays the one BLPA recognizes)."""
    def mapped(a):
        return env[a] if isinstance(a, fx.Node) else a

    args = tuple(fx.node.map_arg(node.args, mapped))
    kwargs = dict(fx.node.map_arg(node.kwargs, mapped))
    inputs = [env[i] for i in node.all_input_nodes]
    candidates = inputs[0].users if inputs else graph.find_nodes(op="call_function", target=node.target)
    return next((u for u in candidates if u.op == "call_function" and u.target is node.target
                 and tuple(u.args) == args and dict(u.kwargs) == kwargs), None)
