"""Replace saved tensors by their encodings: ``rewrite_saved_tensors(program, plan) -> Program``.

Before (one saved tensor ``relu``, read in backward only as ``relu <= 0``)::

    fw:  relu = aten.relu(x)                        ...  return (out, relu)
    bw:  threshold_backward(g, relu, 0)

After (``PredicateMask``: 1 bit per element)::

    fw:  relu = aten.relu(x); packed = <pack bits of relu <= 0>  ...  return (out, packed)
    bw:  relu_d = where(<unpack packed>, 0., 1.); threshold_backward(g, relu_d, 0)

Encoders go right after the producer, decoders right before the first
backward use, so the full tensor lives as briefly as possible (under
Inductor, the readers of a predicate the codec keeps apart, a ReLU
backward's ``x <= 0``, have a decode of their own: :func:`_decode_into`). A
convolution whose input is decoded computes its two gradients apart, the
weight's first (:func:`_split_convolution_backwards`), and two convolutions
that read one decoded input run side by side (:func:`_sink_early_readers`),
so that no decoded input is alive while another gradient its size is made.
An alias (a saved view of another saved tensor) is not saved: the backward
replays the view ops on its base. The input program is not modified.
"""
from __future__ import annotations

import copy
import dataclasses
import operator
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx

from ..codecs.base import Layout
from ..codecs.kernels import share_seed
from ..codecs.uses import VIEW_OPS, PredicateUse, ShapeUse, terminal_users, uses_of, view_closure, view_root
from ..errors import InternalError
from ..ir import META_KEY, CodecPlan, Program, SavedTensor, graph_module
from .select import view_chain
from .splice import call_node, copy_node, splice

__all__ = ["rewrite_saved_tensors"]


def rewrite_saved_tensors(
    program: Program,
    plan: CodecPlan,
    decompositions: Mapping[Any, Callable[..., Any]] | None = None,
    pin_layouts: bool = False,
) -> Program:
    """A new Program whose saved tensors are the plan's encodings.

    ``pin_layouts`` (Inductor): an encoded tensor keeps the strides its
    :class:`SavedTensor` record has, as a saved output would. Inductor lays
    out an intermediate as it likes (a channels-last ResNet's max-pool output
    came out contiguous once it was no output), and an encoder whose groups
    run across the buffer's strides reads each group from far-apart memory,
    in a kernel of its own. So every reader of the tensor, the encoder
    included, reads it through ``prims.inductor_force_stride_order``: a
    layout still open is fixed to those strides, one already fixed the same
    way is kept, any other is copied (so it is right either way). In the
    backward, readers of a kept predicate get a decode of their own and the
    selections they gate are written once (:func:`_decode_into`).
    """
    from ..capture import extract_program  # NB: capture imports passes; keep the cycle lazy

    fw, fw_env = _copy(program.fw)
    bw, bw_env = _copy(program.bw)
    fw_out = fw.graph.output_node()
    outputs = list(fw_out.args[0])
    n_user = program.num_fwd_outputs
    saved_outputs: list[list[fx.Node]] = [[fw_env[s.fw_node]] for s in program.saved]
    placeholders = {s.index: bw_env[s.bw_placeholder] for s in program.saved}

    # Aliases first, latest first: a replayed view chain reads its base's
    # placeholder, which is then itself replaced (by a replay or a decode)
    # before its new first use.
    order = {node: i for i, node in enumerate(program.fw.graph.nodes)}
    for saved in sorted(program.saved, key=lambda s: -order[s.fw_node]):
        decision = plan.decisions[saved.index]
        if decision.alias_of is None:
            continue
        base = program.saved[decision.alias_of]
        ph = placeholders[saved.index]
        saved_outputs[saved.index] = []
        if not ph.users:  # NB: an alias the backward no longer reads (inserting_before(None) is the graph's start)
            bw.graph.erase_node(ph)
            continue
        chain = view_chain(saved.fw_node, base.fw_node)
        env = {base.fw_node: placeholders[base.index]}
        with bw.graph.inserting_before(_first_user(bw.graph, ph)):
            for node in chain:
                env[node] = copy_node(bw.graph, node, env, {"role": "alias", "of": base.name})
        ph.replace_all_uses_with(env[chain[-1]])
        bw.graph.erase_node(ph)

    statistic_of = {bw_env[s.bw_placeholder]: _statistic_root(s.fw_node) for s in program.saved}
    parts_phs: dict[int, list[fx.Node]] = {}
    for saved, decision in zip(program.saved, plan.decisions):
        codec = decision.codec
        if codec is None:
            continue
        tag = {"role": "encode", "codec": codec.name, "of": saved.name}
        reads = [saved.fw_node, *decision.extra_inputs]
        inputs = [fw_env[n] for n in reads]
        last = fw_env[max(reads, key=order.__getitem__)]  # right after the last thing it reads
        if pin_layouts and _pinnable(saved):
            inputs[0] = _pin(fw.graph, inputs[0], saved.stride, tag)
            last = inputs[0] if last is fw_env[saved.fw_node] else last
        with fw.graph.inserting_before(last.next):
            parts = splice(fw.graph, codec.encode, inputs, tag=tag, decompositions=decompositions)
        for i, part in enumerate(parts):
            part.meta[META_KEY]["part"] = i
            if saved.fw_node.meta.get("saved_tensor_with_no_vc_check"):
                part.meta["saved_tensor_with_no_vc_check"] = True
        saved_outputs[saved.index] = parts

        ph = placeholders[saved.index]
        new_phs = []
        with bw.graph.inserting_before(ph):
            for i, part in enumerate(parts):
                new = bw.graph.placeholder(f"{ph.name}_enc{i}")
                new.meta = {"val": part.meta["val"], META_KEY: dict(part.meta[META_KEY])}
                new_phs.append(new)
        parts_phs[saved.index] = new_phs
        centered = _centered_readers(ph, codec, decision.extra_inputs[:1], statistic_of)
        _decode_into(bw.graph, ph, codec, new_phs, saved.name, decompositions, inductor=pin_layouts,
                     centered=centered)

    for saved, decision in zip(program.saved, plan.decisions):
        if decision.derived is None:
            continue
        ph = placeholders[saved.index]
        _decode_into(bw.graph, ph, decision.derived, parts_phs[decision.derived_from], saved.name, decompositions,
                     inductor=pin_layouts)
        saved_outputs[saved.index] = []

    _split_convolution_backwards(bw.graph)
    _sink_early_readers(bw.graph)
    share_seed(fw.graph)  # encoders="triton": one seed for the graph's draws
    rest = outputs[n_user + len(program.saved):]
    new_saved = [n for parts in saved_outputs for n in parts]
    fw_out.args = (tuple(outputs[:n_user] + new_saved + rest),)
    for gm in (fw, bw):
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    rewritten = extract_program(fw, bw, n_user, program.name, program.parameters)
    sources = [i for i, parts in enumerate(saved_outputs) for _ in parts]
    if len(sources) != len(rewritten.saved):
        raise InternalError(f"{program.name}: {len(rewritten.saved)} saved tensors after the rewrite, expected {len(sources)}")
    saved = tuple(dataclasses.replace(s, source=src) for s, src in zip(rewritten.saved, sources))
    return dataclasses.replace(rewritten, saved=saved)


def _pinnable(saved: SavedTensor) -> bool:
    """A dense 4-D tensor in a layout other than contiguous, computed in the forward (not an input,
    not a view) and not returned to the caller.

    NB: 4-D channels-last is what Inductor's layout choices get wrong for an
    encoder (above). Contiguous strides are what an open layout gets anyway;
    pinning those too, and other non-contiguous layouts (the transposed bf16
    copies of a CPU attention's bmm), cost the transformer of the test zoo
    kernels and bytes (``bench/traffic.py --codegen triton``).
    """
    val = saved.fw_node.meta["val"]
    static = all(isinstance(n, int) for n in (*saved.shape, *saved.stride))  # NB: symbolic sizes: left to Inductor
    layout = Layout(saved.shape, saved.stride, saved.dtype, saved.device)
    return (not saved.is_graph_input and not saved.is_forward_output and not val._is_view()
            and len(saved.shape) == 4 and static and layout.is_dense() and not val.is_contiguous())


def _pin(graph: fx.Graph, node: fx.Node, stride: tuple[int, ...], tag: dict) -> fx.Node:
    """Route every reader of ``node`` through ``inductor_force_stride_order(node, stride)``; return that node.

    NB: all readers, not only the encoder: Inductor computes a forced copy of a
    value it has not yet stored apart from the value the others read.
    """
    with graph.inserting_after(node):
        pinned = graph.call_function(torch.ops.prims.inductor_force_stride_order.default, (node, list(stride)))
    node.replace_all_uses_with(pinned, delete_user_cb=lambda user: user is not pinned)
    val = node.meta["val"]
    with val.fake_mode:
        pinned.meta["val"] = torch.empty_strided(val.shape, stride, dtype=val.dtype, device=val.device)
    pinned.meta[META_KEY] = dict(tag)
    return pinned


def _decode_into(graph, ph, codec, parts, of, decompositions, inductor=False, centered=()) -> None:
    """Replace placeholder ``ph`` by ``codec.decode(*parts)``, placed right before its first use.

    ``centered``: subtractions ``x - mean`` of the norm whose input ``ph`` is (:func:`_centered_readers`),
    replaced by ``codec.decode_centered(*parts)``; the rest of ``x``'s readers, if any, get ``decode``.

    ``inductor``: readers of the codec's ``predicate`` alone (a ReLU output's ``x <= 0``, from its
    backward) get ``codec.decode_predicate(*parts)`` instead (:class:`~fxcompress.codecs.base.Codec`),
    before the first of them, and each selection they gate (the ReLU backward's ``where(x <= 0, 0,
    g)``) is written once (:func:`_pin`). Inductor would otherwise inline that selection into each
    kernel that reads it (the batch-norm backward's two or three), each one re-reading the decoded
    values and every gradient summed into ``g``: all of them stayed alive until the last such kernel
    ran, the decoded values included (ResNet-50's backward peak held five activation-sized tensors
    where three do), and each re-read moved bytes. The eager backend runs each op once as it is.
    """
    by_predicate = _predicate_readers(ph, codec) if inductor else []
    tag = {"role": "decode", "codec": codec.name, "of": of}
    if centered:
        with graph.inserting_before(_first_user(graph, ph, centered)):
            (value,) = splice(graph, codec.decode_centered, parts, tag=tag, decompositions=decompositions,
                              fake_mode=_fake_mode(ph))
        for sub in centered:
            a, b = sub.meta["val"], value.meta["val"]
            if a.shape != b.shape or a.dtype != b.dtype:  # NB: strides: Inductor lays out its intermediates
                raise InternalError(f"centered {of} is {tuple(b.shape)}/{b.dtype}, {sub.name} {tuple(a.shape)}/{a.dtype}")
            sub.replace_all_uses_with(value)
            operand = sub.args[0]
            graph.erase_node(sub)
            while operand is not ph and not operand.users:  # the conversions that fed it alone
                operand, dead = operand.args[0], operand
                graph.erase_node(dead)
    readers = [(codec.decode, [u for u in ph.users if u not in by_predicate])]
    if by_predicate:
        readers.append((codec.decode_predicate, by_predicate))
    for decode, users in readers:
        first = _first_user(graph, ph, users)
        if first is None:
            continue
        with graph.inserting_before(first):
            (decoded,) = splice(graph, decode, parts, tag=tag, decompositions=decompositions, fake_mode=_fake_mode(ph))
        _check_same_layout(ph, decoded)
        for user in users:
            user.replace_input_with(ph, decoded)
    for selection in _gated_selections(by_predicate):
        stride = tuple(selection.meta["val"].stride())
        if all(isinstance(s, int) for s in stride):  # NB: symbolic sizes: left to Inductor, as in the forward
            # NB: the selection is the model's own work (its kernel's role, in bench/traffic.py), pinned for the codec
            _pin(graph, selection, stride, {"role": "pin", "codec": codec.name, "of": of})
    graph.erase_node(ph)


def _centered_readers(ph: fx.Node, codec, mean: tuple[fx.Node, ...], statistic_of: dict) -> list[fx.Node]:
    """The nodes ``x - m`` of the backward, where ``x`` is ``ph`` (in ``codec.centered_dtype``) and ``m`` the norm's
    mean: a decomposed batch-, layer- or group-norm backward's first op, which ``codec.decode_centered``
    gives without decoding ``x``. None unless ``codec`` has that decode.

    ``mean``: the forward's statistic the codes were taken with (``Decision.extra_inputs[:1]``);
    ``m`` is that statistic where, looking through views and float conversions, it is the backward
    placeholder of a saved tensor that is (``statistic_of``: placeholder to its forward node's
    :func:`_statistic_root`).

    NB: a conversion may round the mean: Inductor's CPU decomposition saves a bf16 model's
    statistics in bf16, and its backward subtracts that copy. The centered decode is the norm's
    own ``x - mean`` then, as on a GPU, where they stay fp32.
    """
    if not hasattr(codec, "decode_centered") or codec.shift_shape is not None or len(mean) != 1:
        return []
    want, dtype = _statistic_root(mean[0]), codec.centered_dtype
    found, todo = [], [ph]
    while todo:
        node = todo.pop()
        for user in node.users:
            val = user.meta.get("val")
            if not isinstance(val, torch.Tensor) or val.dtype != dtype or user.kwargs:
                continue
            if user.target is torch.ops.prims.convert_element_type.default:
                todo.append(user)
            elif (user.target is torch.ops.aten.sub.Tensor and user.args[0] is node and user.args[1] is not node
                    and isinstance(user.args[1], fx.Node) and val.shape == ph.meta["val"].shape
                    and statistic_of.get(_statistic_root(user.args[1])) is want):
                found.append(user)
    return sorted(found, key=lambda n: n.name)


def _statistic_root(node: fx.Node) -> fx.Node:
    """``node`` looking through views and conversions between float dtypes."""
    while node.op == "call_function" and isinstance(node.args[0], fx.Node) and (
            node.target in VIEW_OPS or (node.target is torch.ops.prims.convert_element_type.default
                                        and node.args[1].is_floating_point
                                        and node.args[0].meta["val"].dtype.is_floating_point)):
        node = node.args[0]
    return node


def _predicate_readers(ph: fx.Node, codec) -> list[fx.Node]:
    """The users of ``ph`` that read nothing of it but ``codec.predicate`` (and its shape), looking
    through views; none where the codec keeps no predicate apart from its values."""
    if not hasattr(codec, "decode_predicate"):
        return []
    wanted = (PredicateUse(codec.predicate), ShapeUse())
    direct = uses_of(ph)
    readers = []
    for user in ph.users:
        if user.op == "call_function" and user.target in VIEW_OPS and user.args[0] is ph:
            uses = [use for _, use in uses_of(user)]
        else:
            uses = [use for reader, use in direct if reader is user]
        if uses and all(use in wanted for use in uses):
            readers.append(user)
    return readers


def _gated_selections(readers: list[fx.Node]) -> list[fx.Node]:
    """The ``aten.where`` nodes whose condition the predicate ``readers`` compute, through views and
    boolean ops (Inductor's decompositions make a ReLU backward ``where(le(x, 0), 0, g)``)."""
    found, todo, seen = [], list(readers), set()
    while todo:
        node = todo.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            val = user.meta.get("val")
            if user.target is torch.ops.aten.where.self and user.args[0] is node:
                found.append(user)
            elif isinstance(val, torch.Tensor) and val.dtype is torch.bool:
                todo.append(user)
    return sorted(found, key=lambda n: n.name)


def _copy(gm: fx.GraphModule) -> tuple[fx.GraphModule, dict[fx.Node, fx.Node]]:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output(out)
    graph.output_node().meta = copy.copy(gm.graph.output_node().meta)
    return graph_module(gm, graph, gm.__class__.__name__), env


def _first_user(graph: fx.Graph, node: fx.Node, among=None) -> fx.Node | None:
    """The first of ``node``'s users (of ``among`` where given) in ``graph``'s order."""
    users = set(node.users if among is None else among)
    for n in graph.nodes:
        if n in users:
            return n
    return None


def _fake_mode(node: fx.Node):
    return node.meta["val"].fake_mode


def _check_same_layout(original: fx.Node, decoded: fx.Node) -> None:
    """The decoded tensor has the saved one's layout: the same strides, or where the saved one was a
    view with gaps (``select``'s dense copy), dense strides in its memory order."""
    a, b = original.meta["val"], decoded.meta["val"]
    same = a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
    expected = Layout.of(a).dense()  # NB: a dense layout's own strides, but for size-1 dims
    strides_ok = all(sa == sb for sa, sb, n in zip(expected.stride, b.stride(), a.shape) if n != 1)
    if not (same and strides_ok):
        raise InternalError(
            f"decoded {original.name} has layout {tuple(b.shape)}/{b.stride()}/{b.dtype}, "
            f"expected {tuple(a.shape)}/{a.stride()}/{a.dtype}"
        )


_CONV_BACKWARD = torch.ops.aten.convolution_backward.default
_CONV = torch.ops.aten.convolution.default
_PIN = torch.ops.prims.inductor_force_stride_order.default


def _role(node: fx.Node) -> str | None:
    """The fxcompress role a node is tagged with (``decode``, ``model``, ...), if any."""
    tag = node.meta.get(META_KEY)
    return tag.get("role") if isinstance(tag, dict) else None


def _split_convolution_backwards(graph: fx.Graph) -> None:
    """A convolution's backward whose input is decoded computes the weight's gradient first, on its own,
    and then the input's, as a transposed convolution of the output's gradient, which reads no input.

    One ``convolution_backward`` call holds the decoded input until both gradients are written, so
    the input's gradient (the same size, or larger under a stride) is allocated while the decoded
    input is still alive: a moment every convolution of a coded model passed through, and where the
    Triton proxy's ResNet-50 ``int2`` step peaked (layer2's first convolution). Split, the decoded
    input is dropped before the input's gradient exists. The kernels are the ones a
    ``convolution_backward`` runs (a weight-gradient and a data-gradient convolution).
    """
    for node in list(graph.nodes):
        if node.target is not _CONV_BACKWARD:
            continue
        grad, x, weight, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, mask = node.args
        if transposed or not (mask[0] and mask[1]) or not _is_decoded(x):
            continue
        fake_mode = grad.meta["val"].fake_mode
        in_shape, out_shape, k = x.meta["val"].shape, grad.meta["val"].shape, weight.meta["val"].shape
        # NB: the transposed convolution's output size: (out - 1) * s - 2p + d (k - 1) + 1 + output_padding
        extra = [in_shape[2 + i] - ((out_shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k[2 + i] - 1) + 1)
                 for i in range(len(stride))]
        tag = {"role": "model", "of": node.name}
        with graph.inserting_before(node):
            weights = call_node(graph, _CONV_BACKWARD, (grad, x, weight, bias_sizes, stride, padding, dilation, False,
                                                        output_padding, groups, [False, True, mask[2]]),
                                fake_mode=fake_mode, tag=tag)
            data = call_node(graph, _CONV,
                             (grad, weight, None, stride, padding, dilation, True, extra, groups),
                             fake_mode=fake_mode, tag=tag)
        expected = next((u.meta["val"] for u in node.users if u.target is operator.getitem and u.args[1] == 0), None)
        got = data.meta["val"]
        if expected is None or (tuple(got.shape), got.stride(), got.dtype) != (tuple(expected.shape), expected.stride(), expected.dtype):
            # NB: the data gradient follows the output gradient's layout, convolution_backward's the input's
            # (a contiguous input under Inductor's channels-last convolutions on a CPU): kept whole, no copy
            graph.erase_node(data)
            graph.erase_node(weights)
            continue
        for user in list(node.users):
            if user.args[1] == 0:
                user.replace_all_uses_with(data)
                graph.erase_node(user)
            else:
                user.replace_input_with(node, weights)
        graph.erase_node(node)


def _is_decoded(x: fx.Node) -> bool:
    """Whether ``x`` (through views and layout pins) is the output of a decoder."""
    node = view_root(x)
    while node.op == "call_function" and node.target is _PIN:
        node = view_root(node.args[0])
    return _role(node) == "decode"


def _sink_early_readers(graph: fx.Graph) -> None:
    """A decoded input that two convolutions read (a ResNet stage's first block: its shortcut's and its
    first convolution's) is decoded once, for the later of them: the earlier one's two gradients
    (:func:`_split_convolution_backwards`) and what reads them before that point move down to it.

    The backward reaches the shortcut's convolution a whole branch before the first convolution. Run
    where it was, it held the decoded input and wrote the shortcut's input gradient, both alive through
    the other branch's backward; moved, only its output gradient is (a quarter of that, for ResNet's
    stride-2 shortcut, in bf16).
    """
    order = {node: i for i, node in enumerate(graph.nodes)}
    pairs = {}
    for node in graph.nodes:
        if _role(node) == "model" and node.target in (_CONV_BACKWARD, _CONV):
            pairs.setdefault(node.meta[META_KEY]["of"], []).append(node)
    for out in [n for n in graph.nodes if _decode_output(n)]:
        readers = sorted((u for u in terminal_users(out) if u.target is _CONV_BACKWARD), key=order.__getitem__)
        if len(readers) < 2:
            continue
        target = readers[-1]
        for reader in readers[:-1]:
            unit = _movable(pairs.get((reader.meta.get(META_KEY) or {}).get("of"), [reader]), target, order)
            if unit is None:
                continue
            for node in sorted(unit, key=order.__getitem__):
                target.prepend(node)
        _move_decoder_before(out, graph)


def _movable(roots, target, order) -> list | None:
    """``roots`` and the nodes reading them (recursively) that run before ``target``: what must move to
    just before ``target`` for ``roots`` to run there; None if that is more than a handful of nodes."""
    unit, stack = set(), list(roots)
    while stack:
        node = stack.pop()
        if node in unit or order[node] >= order[target]:
            continue
        unit.add(node)
        if len(unit) > 16:
            return None
        stack.extend(node.users)
    return list(unit)


def _move_decoder_before(out: fx.Node, graph: fx.Graph) -> None:
    """Move the decoder ``out`` ends, and the views of ``out`` its readers read, to just before its first reader."""
    readers = set(terminal_users(out))
    first = next(n for n in graph.nodes if n in readers)
    views = view_closure(out) - {out}
    for node in _decoder_nodes(out) + [n for n in graph.nodes if n in views]:
        first.prepend(node)


def _decode_output(node: fx.Node) -> bool:
    """The last node of a decoder: tagged ``decode``, read by no node tagged alike."""
    if _role(node) != "decode" or node.op != "call_function":
        return False
    return all(u.meta.get(META_KEY) != node.meta[META_KEY] for u in node.users)


def _decoder_nodes(out: fx.Node) -> list[fx.Node]:
    """The nodes of the decoder ``out`` ends, in graph order: its ancestors tagged as it is."""
    tag, seen, stack = out.meta[META_KEY], set(), [out]
    while stack:
        node = stack.pop()
        if node in seen or node.op != "call_function" or node.meta.get(META_KEY) != tag:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return [n for n in out.graph.nodes if n in seen]
