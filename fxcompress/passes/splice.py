"""The one helper that puts new code into a graph.

``splice(graph, fn, inputs, ...)`` traces ``fn`` to aten ops with ``make_fx``
(on the fake tensors in the inputs' ``meta["val"]``, with the backend's
decomposition table), copies the traced nodes into ``graph`` with their
``meta["val"]``, tags them under ``meta["fxcompress"]`` and returns the nodes
holding ``fn``'s outputs. Traces are cached per (function, input layouts):
a codec is a frozen dataclass, so the many saved tensors of one layout in a
network's repeated blocks share one trace, and each splice of it gets fresh
fake values with the trace's sizes, strides and aliasing.
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.fx.experimental.proxy_tensor import make_fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_map_only

from ..errors import InternalError
from ..ir import META_KEY

__all__ = ["splice", "copy_node", "call_node"]


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
    mode = fake_mode if fake_mode is not None else detect_fake_mode(vals)
    if mode is None:
        raise InternalError(f"no fake mode to trace {fn} in")
    traced = _trace(fn, _layout_key(vals), vals, decompositions, mode)
    env: dict[fx.Node, fx.Node] = {}
    placeholders = iter(inputs)
    outputs: list[fx.Node] = []
    fresh = _FreshValues(mode)
    for node in traced.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(placeholders)
            fresh.bind(node.meta["val"], env[node].meta["val"])
        elif node.op == "output":
            outputs = [env[o] for o in _as_tuple(node.args[0])]
        elif node.op == "call_function":
            env[node] = copy_node(graph, node, env, tag)
            env[node].meta["val"] = tree_map_only(FakeTensor, fresh, node.meta["val"])
        else:
            raise InternalError(f"traced codec code has a {node.op} node: {node.format_node()}")
    return outputs


class _FreshValues:
    """New fake tensors like a cached trace's: same sizes, strides and dtypes, and the same sharing of storage.

    NB: one trace is spliced in many times; nodes must not share fake tensors,
    which would tell Inductor's and AOTAutograd's storage analyses that they
    alias. Like the values ``make_fx`` records, a value that shares storage
    (a view) is a plain tensor on that storage, not a ``_base`` view, and a
    view of a traced input shares the storage of the input spliced in. Values
    are meta tensors wrapped as the mode's fake tensors directly, five times
    cheaper than factory calls dispatched through the fake mode.
    """

    def __init__(self, mode) -> None:
        self.mode = mode
        self.storages: dict[StorageWeakRef, tuple[torch.UntypedStorage, int]] = {}  # -> (storage, byte shift)

    def bind(self, traced: torch.Tensor, actual: torch.Tensor) -> None:
        shift = (actual.storage_offset() - traced.storage_offset()) * traced.element_size()
        self.storages[StorageWeakRef(traced.untyped_storage())] = (actual.untyped_storage(), shift)

    def __call__(self, val: torch.Tensor) -> torch.Tensor:
        key = StorageWeakRef(val.untyped_storage())
        with unset_fake_temporarily():  # NB: the partitioner runs under the fake mode; these are plain meta ops
            if key not in self.storages:
                nbytes = val.untyped_storage().nbytes()
                self.storages[key] = (torch.empty(nbytes, dtype=torch.uint8, device="meta").untyped_storage(), 0)
            storage, shift = self.storages[key]
            offset = val.storage_offset() + shift // val.element_size()
            elem = torch.empty(0, dtype=val.dtype, device="meta").set_(storage, offset, val.shape, val.stride())
            return FakeTensor(self.mode, elem, val.device)


def copy_node(
    graph: fx.Graph, node: fx.Node, env: Mapping[fx.Node, fx.Node], tag: Mapping[str, object]
) -> fx.Node:
    """Copy one ``call_function`` node into ``graph``; ``meta["val"]`` comes with it."""
    if "val" not in node.meta:
        raise InternalError(f"node without meta['val']: {node.format_node()}")
    new = graph.node_copy(node, lambda n: env[n])
    new.meta = {"val": node.meta["val"], META_KEY: dict(tag)}
    return new


def call_node(graph: fx.Graph, target: Any, args: tuple, kwargs: Mapping[str, Any] | None = None, *,
              fake_mode: Any, tag: Mapping[str, object]) -> fx.Node:
    """Insert one ``target(*args, **kwargs)`` node at the graph's insertion point, its ``meta["val"]``
    computed by running ``target`` on the arguments' fake values in ``fake_mode``."""
    kwargs = dict(kwargs or {})

    def val(a: Any) -> Any:
        return a.meta["val"] if isinstance(a, fx.Node) else a

    with fake_mode:
        value = target(*fx.node.map_aggregate(args, val), **fx.node.map_aggregate(kwargs, val))
    node = graph.call_function(target, tuple(args), kwargs)
    node.meta = {"val": value, META_KEY: dict(tag)}
    return node


def _as_tuple(x: object) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _layout_key(vals: tuple) -> tuple:
    return tuple((tuple(v.shape), tuple(v.stride()), v.dtype, v.device) for v in vals)


#: how many codec traces were made, and how often one was reused (read by bench/compile_time.py and the tests)
TRACE_COUNTS: collections.Counter = collections.Counter()


def _trace(fn, key, vals, decompositions, mode) -> fx.GraphModule:
    # NB: a bound method compares its ``self`` by identity; equal codecs (frozen
    # dataclasses) must share a trace, so the key holds the codec itself. A trace
    # belongs to the fake mode it was made in, and a dead mode's id can come back
    # for a new one (between two compiles it did, and served a stale trace whose
    # spliced code changed an Inductor result), so the cache lives on the mode
    # itself and dies with it.
    owner = getattr(fn, "__self__", None)
    fn_key = (getattr(fn, "__func__", fn), owner) if owner is not None else fn
    keys = (fn_key, key, id(decompositions))
    cache = mode.__dict__.setdefault("_fxcompress_traces", {})
    gm = cache.get(keys)
    if gm is not None:
        TRACE_COUNTS["reused"] += 1
        return gm
    with mode:
        # NB: make_fx counts a bound method's ``self`` as an argument; *args hides it.
        gm = make_fx(lambda *args: fn(*args), decomposition_table=decompositions)(*vals)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            raise InternalError(f"codec code captured a constant tensor: {node.format_node()}")
    cache[keys] = gm
    TRACE_COUNTS["made"] += 1
    return gm
