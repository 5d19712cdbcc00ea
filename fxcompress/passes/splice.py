"""The one helper that puts new code into a graph.

``splice(graph, fn, inputs, ...)`` traces ``fn`` to aten ops with ``make_fx``
(on the fake tensors in the inputs' ``meta["val"]``, with the backend's
decomposition table), copies the traced nodes into ``graph`` with their
``meta["val"]``, tags them under ``meta["fxcompress"]`` and returns the nodes
holding ``fn``'s outputs. Traces are cached per (function, input layouts).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch.fx.experimental.proxy_tensor import make_fx

from ..errors import InternalError
from ..ir import META_KEY

__all__ = ["splice", "copy_node"]


def splice(
    graph: fx.Graph,
    fn: Callable[..., Any],
    inputs: Sequence[fx.Node],
    *,
    tag: Mapping[str, object],
    decompositions: Mapping[Any, Callable[..., Any]] | None = None,
    fake_mode: Any = None,
) -> list[fx.Node]:
    """Insert ``fn(*inputs)`` at the graph's current insertion point; return its output nodes.

    ``fn`` returns a tensor or a tuple of tensors. The caller chooses the
    insertion point with ``graph.inserting_before/after``.
    """
    vals = tuple(n.meta["val"] for n in inputs)
    traced = _trace(fn, _layout_key(vals), vals, decompositions, fake_mode)
    env: dict[fx.Node, fx.Node] = {}
    placeholders = iter(inputs)
    outputs: list[fx.Node] = []
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(placeholders)
        elif node.op == "output":
            outputs = [env[o] for o in _as_tuple(node.args[0])]
        elif node.op == "call_function":
            env[node] = copy_node(graph, node, env, tag)
        else:
            raise InternalError(f"traced codec code has a {node.op} node: {node.format_node()}")
    return outputs


def copy_node(
    graph: fx.Graph, node: fx.Node, env: Mapping[fx.Node, fx.Node], tag: Mapping[str, object]
) -> fx.Node:
    """Copy one ``call_function`` node into ``graph``; ``meta["val"]`` comes with it."""
    if "val" not in node.meta:
        raise InternalError(f"node without meta['val']: {node.format_node()}")
    new = graph.node_copy(node, lambda n: env[n])
    new.meta = {"val": node.meta["val"], META_KEY: dict(tag)}
    return new


def _as_tuple(x: object) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _layout_key(vals: tuple) -> tuple:
    return tuple((tuple(v.shape), tuple(v.stride()), v.dtype, v.device) for v in vals)


def _trace(fn, key, vals, decompositions, fake_mode) -> fx.GraphModule:
    # NB: the traced nodes' meta["val"] belong to one fake mode; a graph must
    # not mix modes, so the mode is part of the cache key.
    mode = fake_mode if fake_mode is not None else detect_fake_mode(vals)
    if mode is None:
        raise InternalError(f"no fake mode to trace {fn} in")
    keys = (key, id(decompositions), id(mode))
    return _cached_trace(fn, keys, _Box(vals), _Box(decompositions), _Box(mode))


class _Box:
    """Carries an unhashable value through ``lru_cache`` without taking part in the key."""

    def __init__(self, value: object) -> None:
        self.value = value

    def __hash__(self) -> int:
        return 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Box)


@functools.lru_cache(maxsize=1024)
def _cached_trace(fn, keys, vals: _Box, decompositions: _Box, mode: _Box):
    with mode.value:
        # NB: make_fx counts a bound method's ``self`` as an argument; *args hides it.
        gm = make_fx(lambda *args: fn(*args), decomposition_table=decompositions.value)(*vals.value)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            raise InternalError(f"codec code captured a constant tensor: {node.format_node()}")
    return gm
