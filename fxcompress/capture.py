"""Capture: turn a model into forward/backward :class:`Program` records.

fxcompress hooks into ``torch.compile`` at the partitioner, the point where
AOTAutograd has split the joint graph into a forward and a backward graph and
decided what the forward saves. :class:`Partitioner` runs PyTorch's own
partitioner, then fxcompress's stages, and hands the rewritten graphs back:

    joint graph --PyTorch partitioner--> fw, bw --extract_program--> Program
      --save_predicates--> Program
      --plan_codecs--> CodecPlan --rewrite_saved_tensors--> Program'

For ``backend="inductor"`` it is installed as Inductor's
``custom_partitioner_fn``; for ``backend="eager"`` as AOTAutograd's
``partition_fn`` with compilers that run the graphs as they are.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import itertools
import pathlib
import threading
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._functorch import config as functorch_config
from torch._functorch.partitioners import default_partition, min_cut_rematerialization_partition
from torch._inductor.custom_graph_pass import CustomPartitionerFn
from torch._subclasses.fake_tensor import FakeTensor

from .codecs.base import Layout
from .codecs.uses import terminal_users, view_parent, view_root
from .config import Backend, BasePartitioner, Codec, CompressConfig, LearningRule
from .errors import InternalError
from .ir import META_KEY, CodecPlan, Program, SavedTensor, graph_module, saved_pairs, tensor_nbytes
from .passes.auxiliary import Substitution, apply_ara
from .passes.predicates import save_predicates
from .passes.rewrite import rewrite_saved_tensors
from .passes.select import plan_codecs

__all__ = ["Capture", "CaptureLog", "Partitioner", "extract_program", "make_backend", "restride_for_inductor"]


def extract_program(
    fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int, name: str,
    parameters: frozenset[str] = frozenset(),
) -> Program:
    """Read the saved tensors off a partitioned forward/backward pair.

    The forward's outputs after the first ``num_fwd_outputs`` are the saved
    tensors, then symbolic ints and opaque values; the backward's
    placeholders are those symbolic ints, then the saved tensors, in the same
    order (AOTAutograd calls backward with ``*symints, *saved_tensors, ...``).
    ``parameters`` names the forward placeholders that hold parameters and
    buffers (AOTAutograd's static-lifetime inputs).
    """
    outputs, tensors, placeholders = saved_pairs(fw, bw, num_fwd_outputs)
    fw_inputs = {n for n in fw.graph.nodes if n.op == "placeholder"}
    user_outputs = set(outputs[:num_fwd_outputs])
    index_of = {node: i for i, node in enumerate(tensors)}
    from_parameters = _from_parameters(fw.graph, parameters)
    saved = []
    for i, (node, ph) in enumerate(zip(tensors, placeholders, strict=True)):
        val, pval = node.meta["val"], ph.meta.get("val")
        if pval is None or tuple(pval.shape) != tuple(val.shape) or pval.dtype != val.dtype:
            raise InternalError(
                f"{name}: saved tensor {i} ({node.format_node()}) does not match backward "
                f"placeholder {ph.format_node()}"
            )
        saved.append(
            SavedTensor(
                index=i,
                fw_node=node,
                bw_placeholder=ph,
                shape=tuple(val.shape),
                stride=tuple(val.stride()),
                dtype=val.dtype,
                device=val.device,
                nbytes=tensor_nbytes(val),
                consumers=tuple(terminal_users(ph)),
                is_graph_input=view_root(node) in fw_inputs,
                is_forward_output=node in user_outputs,
                from_parameters=from_parameters[node],
                view_of=_view_base(node, index_of),
                added=node.meta.get(META_KEY, {}).get("saved_by") == "save_predicates",
            )
        )
    return Program(name, fw, bw, num_fwd_outputs, tuple(saved), parameters)


def _from_parameters(graph: fx.Graph, parameters: frozenset[str]) -> dict[fx.Node, bool]:
    """Per node: computed from parameters/buffers alone (at least one, and no other input)."""
    reads_params: dict[fx.Node, bool] = {}
    reads_other: dict[fx.Node, bool] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            reads_params[node], reads_other[node] = node.name in parameters, node.name not in parameters
            continue
        inputs = node.all_input_nodes
        reads_params[node] = any(reads_params[n] for n in inputs)
        reads_other[node] = any(reads_other[n] for n in inputs)
    return {n: reads_params[n] and not reads_other[n] for n in graph.nodes}


def _view_base(node: fx.Node, index_of: dict[fx.Node, int]) -> int | None:
    """Index of the nearest saved tensor that ``node`` is a chain of views of."""
    node = view_parent(node)
    while node is not None:
        if node in index_of:
            return index_of[node]
        node = view_parent(node)
    return None


def save_view_bases(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int) -> int:
    """Save the base of saved tensors that are views of one unsaved forward tensor, which they cover.

    q, k and v split from one projection (GPT-2's ``c_attn``) are saved as three
    views of its output; that storage stays alive whole while any of them is
    saved, and none of them is dense, so no codec applies to any. Saving the base
    too makes each view an alias of it (re-created from it in the backward): the
    storage is stored once, seen whole by the policy. Only where the views hold
    at least the base's element count (so the report never counts more bytes
    than were saved) and are several, or one not dense. Edits the partitioned
    graphs in place; returns how many bases it added.
    """
    outputs, tensors, placeholders = saved_pairs(fw, bw, num_fwd_outputs)
    saved = set(tensors)
    groups: dict[fx.Node, list[int]] = {}
    for i, node in enumerate(tensors):
        root, parent = node, view_parent(node)
        while parent is not None and parent not in saved:
            root, parent = parent, view_parent(parent)
        if parent is None and root is not node and root.op == "call_function":
            groups.setdefault(root, []).append(i)
    added = []
    for root, members in groups.items():
        val = root.meta.get("val")
        if not isinstance(val, FakeTensor) or not Layout.of(val).is_dense():
            continue
        if sum(tensors[i].meta["val"].numel() for i in members) < val.numel():
            continue
        if len(members) == 1 and Layout.of(tensors[members[0]].meta["val"]).is_dense():
            continue  # one dense view (a detach): a codec applies to it as it is
        added.append((min(members), root))
    for first, root in sorted(added, key=lambda a: -a[0]):  # from the back: earlier positions stay valid
        outputs.insert(num_fwd_outputs + first, root)
        with bw.graph.inserting_before(placeholders[first]):
            ph = bw.graph.placeholder(f"{root.name}_base")
        ph.meta["val"] = root.meta["val"]
    if added:
        fw.graph.output_node().args = (tuple(outputs),)
        for gm in (fw, bw):
            gm.graph.lint()
            gm.recompile()
    return len(added)


def drop_unread_running_stats(bw: fx.GraphModule) -> int:
    """Pass ``None`` as the running statistics of every training-mode batch-norm backward.

    ``native_batch_norm_backward`` with ``train=True`` normalizes with the batch statistics it
    is given (``save_mean``, ``save_invstd``) and never reads ``running_mean`` or ``running_var``
    (ATen's kernels, and the decomposition Inductor lowers, take them only when ``train`` is
    false); ``None`` there is what PyTorch itself passes for a norm without running statistics
    (``track_running_stats=False``). Passed anyway, the updated running statistics are saved for
    the backward (two tensors per norm on the eager backend); unread now, the plan stores nothing
    for them. A norm in eval mode inside a training model (``train=False``) reads them and keeps
    them. Edits the partitioned backward in place; returns how many norms changed.
    """
    changed = 0
    for node in bw.graph.find_nodes(op="call_function", target=torch.ops.aten.native_batch_norm_backward.default):
        if node.args[7] is True and (node.args[3] is not None or node.args[4] is not None):
            node.args = (*node.args[:3], None, None, *node.args[5:])
            changed += 1
    if changed:
        bw.graph.lint()
        bw.recompile()
    return changed


def restride_for_inductor(fw: fx.GraphModule, bw: fx.GraphModule, num_fwd_outputs: int) -> int:
    """Give saved tensors the strides Inductor will give them; returns how many changed.

    The codecs group a tensor's elements in memory order, read off its
    strides, so those must be the strides of Inductor's buffer. They differ
    from the traced ones where Inductor's layout optimization makes a graph
    with convolutions channels-last (on GPUs and with oneDNN on CPUs, for
    models in the default contiguous format): a saved forward output that is
    dense, 4-D and on a path into a convolution gets channels-last strides
    (``GraphLowering``'s own rule for outputs). The same rule is applied here
    to the forward node and its backward placeholder (AOTAutograd restrides
    the placeholder the same way). With Inductor's internals moved in a
    future torch, nothing changes: the traced strides are kept.

    NB: Inductor decides on the rewritten forward, and one of its rules
    refuses graphs of 300 or more nodes per convolution. An encoder adds a
    few dozen nodes, and a conv net saves two or three tensors per
    convolution, well under it; a model that crossed it would still compute
    the same values (the pin copies), only slower.
    """
    try:
        from torch._inductor.graph import GraphLowering

        if not GraphLowering.decide_layout_opt(fw, is_inference=False):
            return 0
        prefer = GraphLowering.find_nodes_prefer_channels_last(_GraphOf(fw))
    except Exception:  # noqa: BLE001 - an internal API changed: keep the traced strides
        return 0
    from torch._prims_common import make_channels_last_strides_for

    outputs, tensors, placeholders = saved_pairs(fw, bw, num_fwd_outputs)
    user_outputs = set(outputs[:num_fwd_outputs])
    changed = 0
    for node, ph in zip(tensors, placeholders, strict=True):
        val = node.meta["val"]
        if node not in prefer or node in user_outputs or val.dim() != 4 or not Layout.of(val).is_dense():
            continue
        if any(isinstance(d, torch.SymInt) for d in val.shape):
            continue
        strides = tuple(make_channels_last_strides_for(val.shape))
        if tuple(val.stride()) == strides:
            continue
        with val.fake_mode:
            node.meta["val"] = torch.empty_strided(val.shape, strides, dtype=val.dtype, device=val.device)
            ph.meta["val"] = torch.empty_strided(val.shape, strides, dtype=val.dtype, device=val.device)
        changed += 1
    return changed


@dataclasses.dataclass
class _GraphOf:
    """What ``GraphLowering.find_nodes_prefer_channels_last`` reads of a lowering: its module."""

    module: fx.GraphModule


@dataclasses.dataclass(frozen=True)
class Capture:
    """What one partitioner call saw and produced."""

    key: Any  # the Dynamo frame this graph came from; a recompile replaces its entry
    original: Program
    plan: CodecPlan
    rewritten: Program
    substitutions: tuple[Substitution, ...] = ()  # learning_rule="ara": what each conv's weight gradient reads
    partitioned: Program | None = None  # PyTorch's partition, where fxcompress saved more (save_predicates)

    @property
    def before(self) -> Program:
        """What plain ``torch.compile`` saves: the program before fxcompress's stages."""
        return self.partitioned or self.original


class CaptureLog:
    """The captures of one compiled module, latest per Dynamo frame."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[Any, Capture] = {}
        self._names: dict[Any, str] = {}
        self._uncaptured: dict[str, None] = {}  # Dynamo's reasons for code it left out, in order

    def note_uncaptured(self, reasons: list[str]) -> None:
        """Record why Dynamo left some of the model's code out of its graphs (graph breaks, skips)."""
        with self._lock:
            self._uncaptured.update(dict.fromkeys(reasons))

    def uncaptured(self) -> list[str]:
        with self._lock:
            return list(self._uncaptured)

    def name_for(self, key: Any) -> str:
        """A stable name per Dynamo frame, in order of first capture: graph0, graph1, ..."""
        with self._lock:
            return self._names.setdefault(key, f"graph{len(self._names)}")

    def record(self, capture: Capture) -> None:
        with self._lock:
            self._by_key.pop(capture.key, None)
            self._by_key[capture.key] = capture

    def captures(self) -> list[Capture]:
        with self._lock:
            return list(self._by_key.values())


_counter = itertools.count()


def _frame_key() -> Any:
    compile_id = torch._guards.CompileContext.current_compile_id()
    if compile_id is None:
        return ("call", next(_counter))
    return ("frame", compile_id.frame_id)


@functools.lru_cache(maxsize=1)
def _source_hash() -> str:
    """Hash of fxcompress's own source: a code change must invalidate compiled caches."""
    h = hashlib.sha256()
    root = pathlib.Path(__file__).parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


class Partitioner(CustomPartitionerFn):
    """PyTorch's partitioner followed by fxcompress's stages.

    ``uuid()`` covers the config and fxcompress's source, so Inductor's and
    AOTAutograd's caches never serve a graph compiled under another config.
    """

    def __init__(self, config: CompressConfig, backend: Backend, log: CaptureLog) -> None:
        self.config = config
        self.backend = backend
        self.log = log

    def __deepcopy__(self, memo: dict) -> "Partitioner":
        # NB: Inductor deep-copies its config (this object included) for cache
        # keys; the capture log must stay shared, and uuid() already identifies us.
        return self

    def __copy__(self) -> "Partitioner":
        return self

    def __reduce__(self):
        # NB: torch 2.11's FX graph cache pickles Inductor's config, this object
        # included, into its cache key (later versions key it by uuid() only).
        # The capture log's lock does not pickle, and the key needs only uuid().
        # A copy is this object itself (__copy__, __deepcopy__), never the string.
        return str, (self.uuid(),)

    def uuid(self) -> str:
        return hashlib.sha256(
            f"{self.config.describe()}|{self.backend.value}|{_source_hash()}|{torch.__version__}".encode()
        ).hexdigest()

    def __call__(self, gm: fx.GraphModule, joint_inputs: Any, **kwargs: Any):
        kwargs.pop("compiler", None)
        fw, bw = self._base()(gm, joint_inputs, **kwargs)
        key = _frame_key()
        name = self.log.name_for(key)
        # NB: the forward's placeholders are the joint graph's primals, in order and by name.
        primals = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        parameters = frozenset(primals[i] for i in kwargs.get("static_lifetime_input_indices") or ())
        # NB: for every codec, none included: the inventory counts a storage that saved views
        # share once, so saved_bytes_before is the same number whatever the codec.
        save_view_bases(fw, bw, kwargs["num_fwd_outputs"])
        if self.config.codec is not Codec.NONE:
            drop_unread_running_stats(bw)
        if self.config.codec is not Codec.NONE and self.backend is Backend.INDUCTOR:
            restride_for_inductor(fw, bw, kwargs["num_fwd_outputs"])
        partitioned = program = extract_program(fw, bw, kwargs["num_fwd_outputs"], name, parameters)
        if self.config.codec not in (Codec.NONE, Codec.LOSSLESS):
            fw, bw = save_predicates(fw, bw, kwargs["num_fwd_outputs"])
            if fw is not partitioned.fw:
                program = extract_program(fw, bw, kwargs["num_fwd_outputs"], name, parameters)
        learned, substitutions = program, ()
        if self.config.learning_rule is LearningRule.ARA:
            learned, substitutions = apply_ara(program, self.config.ara_stride)
        plan = plan_codecs(learned, self.config)
        rewritten = rewrite_saved_tensors(learned, plan, self._decompositions(),
                                          pin_layouts=self.backend is Backend.INDUCTOR)
        if self.backend is Backend.INDUCTOR:
            _lower_random_ops(rewritten.fw)
        self.log.record(Capture(key, program, plan, rewritten, substitutions,
                                partitioned if partitioned is not program else None))
        # NB: the compilers get copies: Inductor's passes edit the graphs they
        # are given in place (torch 2.11's noop removal erased a saved cast the
        # record still named), and the record must stay the program fxcompress built.
        return _copy(rewritten.fw), _copy(rewritten.bw)

    def _base(self) -> Callable[..., tuple[fx.GraphModule, fx.GraphModule]]:
        choice = self.config.base_partitioner
        if choice is BasePartitioner.AUTO:
            choice = BasePartitioner.MIN_CUT if self.backend is Backend.INDUCTOR else BasePartitioner.DEFAULT
        if choice is BasePartitioner.DEFAULT:
            return default_partition
        compiler = "inductor" if self.backend is Backend.INDUCTOR else "eager"
        return functools.partial(min_cut_rematerialization_partition, compiler=compiler)

    def _decompositions(self):
        if self.backend is Backend.INDUCTOR:
            from torch._inductor.decomposition import select_decomp_table

            return select_decomp_table()
        return None


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with its own graph: same node names, each node's meta copied shallowly."""
    return graph_module(gm, copy.deepcopy(gm.graph))


def _lower_random_ops(fw: fx.GraphModule) -> None:
    """Turn the ``aten.rand`` of stochastic rounding (``aten.randint``: the seed of ``encoders="triton"``)
    into Inductor's seeded random ops.

    NB: Inductor rewrites random ops in its joint-graph passes, which run
    before the partitioner; ops inserted after it must go through the same
    pass or they fail to lower. This edits the freshly rewritten forward
    (fxcompress's own copy) in place.
    """
    if not any(n.target in (torch.ops.aten.rand.default, torch.ops.aten.randint.low) for n in fw.graph.nodes):
        return
    from torch._inductor.fx_passes.replace_random import replace_random_passes
    from torch._inductor.virtualized import V

    fake_mode = next(n.meta["val"].fake_mode for n in fw.graph.nodes if isinstance(n.meta.get("val"), FakeTensor))
    with V.set_fake_mode(fake_mode):
        replace_random_passes(fw)
    fw.graph.lint()
    fw.recompile()


def _run_as_is(gm: fx.GraphModule, example_inputs: Any) -> Callable[[list], Any]:
    """The eager backend's compiler: ``gm`` itself, called the boxed way, so that each input is freed
    at its last use (a saved tensor in the backward, as Inductor's code and the liveness plan free it).

    NB: AOTAutograd hands the compiled backward its only list of the saved tensors, and FX's boxed
    code generation empties that list once it has bound the names; each name is then dropped after
    its last use. Calling ``gm.forward(*args)`` (functorch's ``make_boxed_func``) left the list
    holding every saved tensor until the backward returned: under ``none`` a ResNet-50 step's peak
    was 12.7% above the plan's on an H100 (``bench/results/peak_h100.json``).
    """
    try:
        from torch.fx.graph import _BoxedCodeGen
    except ImportError:  # NB: private to FX (torch 2.11-2.13 have it): without it, the old way
        from functorch.compile import make_boxed_func

        return make_boxed_func(gm.forward)
    gm.graph.set_codegen(_BoxedCodeGen())
    gm.recompile()

    def run(args: list) -> Any:
        return gm.forward(args)

    run._boxed_call = True
    return run


def make_backend(config: CompressConfig, backend: Backend, log: CaptureLog) -> Callable[..., Any]:
    """A ``torch.compile`` backend that runs fxcompress at the partitioner."""
    partitioner = Partitioner(config, backend, log)
    if backend is Backend.EAGER:
        from torch._dynamo.backends.common import aot_autograd

        # NB: buffer updates (batch-norm running statistics) stay in the forward graph, as under
        # aot_eager and Inductor. Applied after the forward instead, they bumped the version of a
        # buffer that activation checkpointing's recomputation had saved, and autograd refused it.
        return aot_autograd(fw_compiler=_run_as_is, bw_compiler=_run_as_is, partition_fn=partitioner,
                            keep_inference_input_mutations=True)

    def inductor(gm: fx.GraphModule, example_inputs: Any):
        from torch._inductor.compile_fx import compile_fx

        # NB: AOTAutograd's cache would skip the partitioner on a hit, and with
        # it the record that explain() reads; Inductor's own FX graph cache
        # (keyed on the rewritten graph and on uuid()) still applies.
        # Inductor's reorder_for_peak_memory may pick a breadth-first order that
        # runs every node whose inputs are all graph inputs first: every decoder,
        # hoisting all decoded activations to the start of the backward (seen on
        # an H100: ResNet-50 int4 kept 9.5 of 10.1 GiB). The rewrite already
        # places each encoder after its producer and each decoder before its
        # first use, so that order is kept.
        # NB: config_patches also reach the backward, which compiles later.
        with functorch_config.patch(enable_autograd_cache=False):
            return compile_fx(gm, example_inputs, config_patches={
                "custom_partitioner_fn": partitioner, "reorder_for_peak_memory": False})

    return inductor
