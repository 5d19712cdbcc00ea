"""Liveness over one training step: ``analyze_liveness(program) -> Liveness``.

One timeline: the forward's nodes, then the backward's. Every tensor a node
produces gets a :class:`LiveRange` from its producer to its last use; a
saved tensor spans from its forward producer to its last backward use (its
backward placeholder's last use); views and ``getitem`` results alias the
storage of their base, which lives as long as any alias does; each output of
a multi-output op is its own allocation, held by its ``getitem`` (outputs
nothing reads are not counted). Bytes come from ``meta["val"]``.

    >>> live = analyze_liveness(program)
    >>> live.peak_bytes, live.order[live.peak_step]

Graph inputs of the forward (parameters, buffers, the batch) are owned by
the caller and not counted; the backward's results (gradients) live to the
end of the step. Within one graph, :attr:`Liveness.last_use` is the node
after which FX's own generated code drops a value (``x = None``).

With ``inductor=True`` (the program is compiled by Inductor) and where
Inductor generates Triton (:func:`writes_triton`), the plan follows what that
code makes of the graph: an elementwise value (a cast, a scale, a codec's
unpack, a step of a decomposed norm's backward) that exactly one elementwise
op or reduction reads is computed inside that reader's kernel and takes no
memory of its own (:func:`inlined_nodes`). A value several ops read is
counted as written out, though Inductor often recomputes it in each reader
instead: its rule for that depends on the device and on the kernel's size,
so the plan takes the larger count there. A value a convolution, a matmul,
another extern kernel or a layout pin (``prims.inductor_force_stride_order``,
not elementwise) reads is written out. Everything else counts as the eager
backend runs it.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from ..codecs.uses import VIEW_OPS, view_root
from ..ir import Program, elementwise, tensor_nbytes

__all__ = ["LiveRange", "Liveness", "analyze_liveness", "inlined_nodes", "writes_triton"]

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class LiveRange:
    """A storage live on steps ``start..end`` (inclusive) of the step's timeline.

    Invariant: ``0 <= start <= end < len(Liveness.order)``; ``node`` is the
    node that allocated the storage (a view's range is its base's).
    """

    node: fx.Node
    start: int
    end: int
    nbytes: int
    saved: bool  # crosses from the forward into the backward


@dataclasses.dataclass(frozen=True)
class Liveness:
    order: tuple[fx.Node, ...]  # forward nodes, then backward nodes
    num_forward: int
    ranges: tuple[LiveRange, ...]
    last_use: dict[fx.Node, fx.Node]  # per graph: the node after which FX drops the value
    live_bytes: tuple[int, ...]  # bytes live at each step of ``order``

    @property
    def peak_bytes(self) -> int:
        return max(self.live_bytes, default=0)

    @property
    def peak_step(self) -> int:
        return max(range(len(self.live_bytes)), key=self.live_bytes.__getitem__, default=0)

    @property
    def saved_bytes(self) -> int:
        return sum(r.nbytes for r in self.ranges if r.saved)


def analyze_liveness(program: Program, *, inductor: bool = False) -> Liveness:
    fw_nodes = [n for n in program.fw.graph.nodes if n.op != "output"]
    bw_nodes = [n for n in program.bw.graph.nodes if n.op != "output"]
    order = tuple(fw_nodes + bw_nodes)
    step = {n: i for i, n in enumerate(order)}
    end_of_step = len(order) - 1

    last_use = {**_last_uses(program.fw.graph), **_last_uses(program.bw.graph)}
    # name-level end of each node's value, within its own graph
    name_end = {n: step[last_use[n]] if n in last_use else step[n] for n in order}
    for node in _output_values(program.bw.graph):  # gradients outlive the step's last op
        name_end[node] = end_of_step
    for node in _output_values(program.fw.graph):  # user outputs: held until the backward ran
        name_end[node] = max(name_end[node], len(fw_nodes))

    # storage level: a base lives as long as any alias of it; a saved value's backward placeholder,
    # and every view the backward makes of it (GPT-2's loss reads its log-softmax through a
    # detach), are aliases of the forward storage it was saved from
    producer = {s.bw_placeholder: view_root(s.fw_node) for s in program.saved}
    storage_end: dict[fx.Node, int] = {}
    for node in order:
        base = view_root(node)
        base = producer.get(base, base)
        storage_end[base] = max(storage_end.get(base, step[base]), name_end[node])

    saved_bases = set(producer.values())
    inlined = inlined_nodes(program) if inductor and writes_triton(program) else frozenset()
    ranges = []
    for base, end in storage_end.items():
        if base in inlined:
            continue  # computed inside its readers' kernels
        if base.op == "placeholder" and base.graph is program.fw.graph:
            continue  # owned by the caller
        ranges.append(LiveRange(base, step[base], end, _bytes(base), base in saved_bases))
    live = [0] * len(order)
    for r in ranges:
        for i in range(r.start, r.end + 1):
            live[i] += r.nbytes
    return Liveness(order, len(fw_nodes), tuple(ranges), last_use, tuple(live))


def inlined_nodes(program: Program) -> frozenset[fx.Node]:
    """The values Inductor computes inside the kernels that read them, writing none out.

    A node of the forward or backward that is elementwise, whose readers
    (looking through views) are all elementwise ops or reductions (so never a
    saved tensor: the forward's output reads those): Inductor inlines a
    pointwise producer into its consumers' loops (``test_inductor.py`` checks
    that the decoders fuse), and recomputes it in each, unless its loop body,
    through the values inlined into it (:func:`_loop_body`), is too big to
    recompute: then Inductor writes it out (:func:`_realized`, under a GPU's
    thresholds; the op count is the loop's loads plus its FX nodes, close to
    Inductor's own count of its loop body).
    On ResNet-50's Triton code (CPU proxy, batch 32, bf16) this brings the
    plan from 25-28% above the measured step peak to within 2% of it
    (``peak_cpu.json``); counting a value several ops read as written out,
    it was 3.2% (``int4``) and 8.5% (``int2``) above (the batch norm's x - mean, read by its reductions
    and its output, held the plan's peak in layer1's backward).
    """
    inlined: set[fx.Node] = set()
    body: dict[fx.Node, tuple[frozenset[fx.Node], frozenset[fx.Node]]] = {}
    for graph in (program.fw.graph, program.bw.graph):
        for node in graph.nodes:  # topological: a node's inputs are decided first
            if not elementwise(node):
                continue
            readers = _readers(node)
            if not readers or not all(map(_fusable, readers)):
                continue
            body[node] = reads, nodes = _loop_body(node, inlined, body)
            if not _realized(len(readers), len(reads), len(reads) + len(nodes)):
                inlined.add(node)
    return frozenset(inlined)


# torch._inductor.config's thresholds for a GPU: realize_reads_threshold (a value read by several
# ops), realize_acc_reads_threshold (by one), realize_opcount_threshold, and the op count past
# which GraphLowering realizes any pointwise value
_REALIZE_READS, _REALIZE_ACC_READS, _REALIZE_OPS, _REALIZE_ANY_OPS = 4, 8, 30, 100


def _realized(readers: int, reads: int, ops: int) -> bool:
    """Whether Inductor writes out a pointwise value with this many readers, buffer reads and ops.

    Several readers: ``should_realize_on_reuse``. One reader: ``has_exceeded_max_reads``, whose
    ``realize_hint`` keeps a value that reads one buffer inline, unless it is past 100 ops.
    Left out: the CPU's own rule (a value several ops read is written out where it computes an
    exp, log, sigmoid or tanh), since the plan is for a GPU's code; the CPU proxy follows it.
    """
    if readers > 1:
        return reads > _REALIZE_READS or ops > _REALIZE_OPS
    return (reads > 1 and (reads > _REALIZE_ACC_READS or ops > _REALIZE_OPS)) or ops > _REALIZE_ANY_OPS


# values Inductor computes from the loop index wherever they are read (a constant, an iota): no load
_COMPUTED_FROM_INDEX = frozenset({torch.ops.prims.iota.default, torch.ops.aten.full.default,
                                  torch.ops.aten.scalar_tensor.default})


def _loop_body(node: fx.Node, inlined: set[fx.Node], body: dict) -> tuple[frozenset[fx.Node], frozenset[fx.Node]]:
    """The buffers ``node``'s loop reads and the nodes it computes, when the values in ``inlined``
    are computed inside it (its op count: a load per buffer, an op per node)."""
    reads, nodes = set(), {node}
    for value in map(view_root, node.all_input_nodes):
        if value.target in _COMPUTED_FROM_INDEX:
            nodes.add(value)
        elif value in inlined:
            more, inner = body[value]
            reads |= more
            nodes |= inner
        else:
            reads.add(value)
    return frozenset(reads), frozenset(nodes)


def writes_triton(program: Program) -> bool:
    """Whether Inductor generates Triton for ``program``'s device, the code :func:`inlined_nodes`
    describes: on a GPU, and on a CPU under ``torch._inductor.config.cpu_backend = "triton"``.
    Inductor's C++ code for a CPU writes out more (ResNet-50 batch 16, fp32: the inlined plan
    was 11% under ``int4``'s measured peak, 15% under ``int2``'s), so there the plan counts
    every value."""
    import torch._inductor.config as inductor_config

    devices = {n.meta["val"].device.type for n in program.fw.graph.find_nodes(op="placeholder")
               if isinstance(n.meta.get("val"), torch.Tensor)}
    return devices != {"cpu"} or inductor_config.cpu_backend == "triton"


def _readers(node: fx.Node) -> list[fx.Node]:
    out = []
    for user in node.users:
        if user.op == "call_function" and user.target in VIEW_OPS and user.args[0] is node:
            out += _readers(user)
        else:
            out.append(user)
    return out


def _fusable(reader: fx.Node) -> bool:
    return elementwise(reader) or (isinstance(reader.target, torch._ops.OpOverload)
                                    and torch.Tag.reduction in reader.target.tags)


def _bytes(node: fx.Node) -> int:
    val = node.meta.get("val")
    return tensor_nbytes(val) if isinstance(val, torch.Tensor) else 0  # a tuple's parts count at their getitem


def _output_values(graph: fx.Graph) -> list[fx.Node]:
    out = graph.output_node().args[0]
    return [n for n in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(n, fx.Node)]


def _last_uses(graph: fx.Graph) -> dict[fx.Node, fx.Node]:
    """For each value, the last node of ``graph`` that reads it (outputs excluded); an op's
    value nothing reads (an in-place ``copy_`` into a buffer), the op itself, as FX drops it."""
    last: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "output":
            continue
        for used in node.all_input_nodes:
            last[used] = node
        if node.op == "call_function" and not node.users:
            last[node] = node
    return last
