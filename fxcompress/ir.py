"""The values handed from one stage to the next.

capture -> :class:`Program` -> select -> :class:`CodecPlan`
-> rewrite -> :class:`Program` (rewritten) -> :class:`Report`.

Analysis results live here, keyed by records, never as attributes on
``fx.Node``; anything fxcompress stores in ``node.meta`` sits under the one
key :data:`META_KEY`.
"""
from __future__ import annotations

import collections
import dataclasses
import operator
import re
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from .errors import InternalError

if TYPE_CHECKING:
    from .codecs import Codec

__all__ = ["META_KEY", "SavedTensor", "Program", "Decision", "CodecPlan", "ReportRow", "Report"]

META_KEY = "fxcompress"


def module_path(node: fx.Node) -> str:
    """Path of the innermost module that made ``node`` (``stage1.0.conv1``), or ``""`` if none did.

    Read from Dynamo's ``nn_module_stack`` (forward nodes) or AOTAutograd's
    ``fwd_nn_module_stack`` (backward nodes), without Dynamo's ``L['self']`` prefix.
    """
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    for prefix in ("L['self'].", "L['self']"):
        if path.startswith(prefix):
            return path[len(prefix):]
    return path


def graph_module(root: fx.GraphModule, graph: fx.Graph, name: str = "GraphModule") -> fx.GraphModule:
    """``fx.GraphModule(root, graph, name)``, lazy where ``torch.compile`` makes its own lazy.

    NB: fxcompress builds several GraphModules per captured graph (the rewrite's
    copies, the compilers' copies) that nobody runs, and generating a ResNet-50
    backward's Python code takes a fifth of a second each time. Under
    ``torch.compile`` (``torch._dynamo.config.use_lazy_graph_module``, on by
    default) FX's ``_LazyGraphModule`` generates it when first run or read, as
    Dynamo and AOTAutograd do for theirs; elsewhere this is a plain GraphModule.
    """
    from torch.fx._lazy_graph_module import _make_graph_module

    return _make_graph_module(root, graph, name)


def tensor_nbytes(val: torch.Tensor) -> int:
    """Bytes a dense tensor of this shape and dtype occupies."""
    return int(val.numel()) * val.element_size()


@dataclasses.dataclass(frozen=True)
class SavedTensor:
    """One tensor the forward graph saves for the backward graph.

    Invariant: ``fw_node`` is output ``num_fwd_outputs + index`` of the
    forward graph and ``bw_placeholder`` is the backward placeholder that
    receives it; the pairing is positional (AOTAutograd's calling
    convention), never by name.
    """

    index: int
    fw_node: fx.Node
    bw_placeholder: fx.Node
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    nbytes: int
    consumers: tuple[fx.Node, ...]  # backward nodes that read it, through detach/views
    is_graph_input: bool  # a parameter, buffer or user input: its owner keeps it alive
    is_forward_output: bool  # also returned to the caller, who may keep it alive
    from_parameters: bool = False  # computed from parameters/buffers alone (autocast's weight copy)
    view_of: int | None = None  # index of the saved tensor whose storage this one views
    source: int | None = None  # in a rewritten Program: index of the original tensor this encodes
    added: bool = False  # saved by fxcompress, not by PyTorch's partitioner (passes/predicates.py)

    @property
    def name(self) -> str:
        return self.fw_node.name

    @property
    def module(self) -> str:
        """Path of the module whose forward made it (``""`` for graph inputs and glue code)."""
        return module_path(self.fw_node)

    @property
    def own_bytes(self) -> int:
        """Bytes this saved tensor adds: 0 for a view of another saved tensor."""
        return 0 if self.view_of is not None else self.nbytes

    @property
    def op(self) -> str:
        """The aten op that produced it (``input`` for graph inputs)."""
        node = self.fw_node
        if node.op == "placeholder":
            return "input"
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            return f"{target_name(node.args[0])}[{node.args[1]}]"  # which output of a tuple op
        return target_name(node)


@dataclasses.dataclass(frozen=True)
class Program:
    """A forward/backward pair of graphs from one captured (sub)graph.

    ``fw`` outputs are ``num_fwd_outputs`` user outputs, then the saved
    tensors in ``saved`` order, then saved symbolic ints and opaque values.
    ``bw`` placeholders are the saved symbolic ints, then the saved tensors,
    then the rest (tangents, RNG offsets).
    """

    name: str
    fw: fx.GraphModule
    bw: fx.GraphModule
    num_fwd_outputs: int
    saved: tuple[SavedTensor, ...]
    parameters: frozenset[str] = frozenset()  # forward placeholders that hold parameters/buffers


@dataclasses.dataclass(frozen=True)
class Decision:
    """What happens to one saved tensor, and why.

    ``codec`` is ``None`` when the tensor stays as it is; ``reason`` then
    says why. ``alias_of`` names the saved index whose storage it shares;
    ``derived_from`` the saved index whose encoding also yields this tensor
    (BLPA's ReLU output), in which case nothing of its own is stored.
    """

    codec: Codec | None
    reason: str
    alias_of: int | None = None
    extra_inputs: tuple[fx.Node, ...] = ()  # forward nodes the encoder reads besides the tensor
    derived_from: int | None = None  # saved index whose encoding this tensor is decoded from
    derived: Any = None  # the decoder (``decode(*parts of derived_from)``) when derived_from is set


@dataclasses.dataclass(frozen=True)
class CodecPlan:
    """One :class:`Decision` per saved tensor, in ``Program.saved`` order."""

    decisions: tuple[Decision, ...]


@dataclasses.dataclass(frozen=True)
class ReportRow:
    program: str
    name: str
    op: str
    shape: tuple[int, ...]
    dtype: str
    codec: str
    bytes_before: int
    bytes_after: int
    reason: str
    counted: bool  # False for graph inputs: their owner keeps them alive anyway
    module: str = ""  # path of the module that made it, e.g. "stage1.0.conv1"
    from_parameters: bool = False  # computed from parameters alone (autocast's weight copy)


@dataclasses.dataclass(frozen=True)
class Report:
    """What fxcompress did to every saved tensor of a compiled module.

    ``saved_bytes_before``/``_after`` sum the rows the step itself allocates
    (graph inputs such as weights are listed but not counted).
    """

    config: str
    rows: tuple[ReportRow, ...]
    notes: tuple[str, ...] = ()
    predicted_peak_bytes_before: int | None = None
    predicted_peak_bytes_after: int | None = None
    forward_buffers: int | None = None  # shared buffers for the rewritten forward's transients
    forward_arena_bytes: int | None = None  # their total size
    forward_naive_bytes: int | None = None  # one allocation per transient instead
    substitutions: tuple = ()  # learning_rule="ara": passes.auxiliary.Substitution per conv
    learning_indicator: dict | None = None  # layer -> LI, when explain() was given inputs

    @property
    def saved_bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.rows if r.counted)

    @property
    def saved_bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.rows if r.counted)

    def by_codec(self) -> list[tuple[str, int, int, int]]:
        """The counted rows grouped by what happened to them, most bytes after first:
        ``(label, tensors, bytes before, bytes after)``. The label is the codec (without the
        tensor it names, as in ``alias(x)``), or for a tensor kept as it is, ``kept: `` and why."""
        groups: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
        for r in self.rows:
            if not r.counted:
                continue
            if r.codec == "none":
                label = "kept: " + re.split(r"[:(]", r.reason)[0].strip()
            else:
                label = re.sub(r"\(.*\)$", "", r.codec)
            g = groups[label]
            g[0], g[1], g[2] = g[0] + 1, g[1] + r.bytes_before, g[2] + r.bytes_after
        return sorted(((k, *v) for k, v in groups.items()), key=lambda t: (-t[3], -t[2], t[0]))

    def __str__(self) -> str:
        from .visualize.report import format_report

        return format_report(self)


def saved_pairs(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int):
    """The forward's outputs, its saved tensors, and the backward placeholder of each, by position
    (:class:`Program` states the calling convention)."""
    outputs = list(fw.graph.output_node().args[0])
    tensors, n_sym = _saved_values(outputs[num_fwd_outputs:])
    bw_phs = [n for n in bw.graph.nodes if n.op == "placeholder"]
    return outputs, tensors, bw_phs[n_sym: n_sym + len(tensors)]


def _saved_values(extra: list) -> tuple[list[fx.Node], int]:
    """The forward's saved tensors (a prefix of its outputs after the user's) and how many symbolic
    ints follow them (the backward's first placeholders)."""
    tensors = [n for n in extra if isinstance(n, fx.Node) and isinstance(n.meta.get("val"), FakeTensor)]
    if extra[: len(tensors)] != tensors:
        raise InternalError("saved tensors are not a prefix of the saved values")
    return tensors, sum(1 for n in extra if isinstance(n, fx.Node) and _is_sym(n))


def _is_sym(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool, int))


def elementwise(node: fx.Node) -> bool:
    """An elementwise aten op (tagged pointwise, or a ``_to_copy`` that only casts the dtype)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    if node.target is torch.ops.aten._to_copy.default:  # a dtype cast; a device or layout change is a copy
        return set(node.kwargs) <= {"dtype"}
    return torch.Tag.pointwise in node.target.tags


def target_name(node: fx.Node) -> str:
    """``relu``, ``gt.Scalar``: an aten overload's short name (``default`` left out)."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        packet, overload = t._schema.name.split("::")[-1], t._overloadname
        return packet if overload == "default" else f"{packet}.{overload}"
    return getattr(t, "__name__", str(t))

