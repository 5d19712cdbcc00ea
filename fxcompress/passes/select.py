"""Select a codec for every saved tensor: ``plan_codecs(program, config) -> CodecPlan``.

The policy, in order, for each saved tensor (the first rule that decides wins):

1. ``codec="none"``: keep.
2. A graph input (parameter, buffer, user input) or a tensor also returned
   to the caller: keep -- its owner holds it alive, a copy would add memory.
3. Reached from another saved tensor through view ops: an alias; the backward
   re-creates the view from that tensor and nothing extra is stored. (Views
   of one unsaved tensor that they cover, such as q, k and v split from one
   projection, get that tensor saved as their base first:
   :func:`~fxcompress.capture.save_view_bases`.)
4. With ``blpa8``/``blpa4``: the input of a training-mode batch-norm gets
   the BN-aware :class:`BLPA` code, and a saved ReLU of that batch-norm's
   output, or its mask ``relu <= 0`` (saved by ``save_predicates``), is
   decoded from the same code (nothing of its own stored); where rules 1-3
   keep the batch-norm input as it is, none of them.
5. Not read by the backward at all: nothing stored (:class:`Unread`).
   ``save_predicates`` saved what the backward read of it, or it is a
   training-mode batch norm's updated running statistic, which
   :func:`~fxcompress.capture.drop_unread_running_stats` took out of the
   norm's backward.
6. Smaller than ``min_bytes``: keep (BN statistics, RNG seeds, scalars).
7. Not dense in memory (gaps or overlaps): keep.
8. bool: :class:`BitMask` (a comparison that
   :func:`~fxcompress.passes.predicates.save_predicates` added among them).
9. A select of two constants, ``where(c, a, b)`` (an additive attention
   mask of 0 and -inf): :class:`Select`, 1 bit per element, exact (a
   lossy code of a group holding -inf would decode to NaN).
10. Read as values by an op that needs them exact (normalization
    statistics, attention's log-sum-exp, a divisor that broadcasts: a
    normalizer such as a linear attention's), a random generator's state
    saved for a checkpointed recomputation, a normalization statistic the
    graph computes itself (a decomposed norm's ``var_mean``: Inductor's
    graphs), or computed from parameters alone
    (autocast's low-precision weight copy, which input gradients read, so an
    error in it would reach every earlier layer): keep.
11. Read as values otherwise: with a per-group lossy codec (or BLPA's
    ``blpa_fallback``) a float tensor is quantized (:class:`GroupAffine` or
    :class:`GroupFP8`), and if it is also read through one predicate, that
    predicate is kept exact: for a clamp's output read as ``x <= c`` (a
    ReLU's output read by ``threshold_backward``) by a reserved integer code
    (:class:`ClampedAffine`, unbiased, no extra bytes); otherwise, with
    rounding to nearest and a one-sided predicate, by the integer codes
    themselves (:class:`SplitAffine`); otherwise by a 1-bit mask stored
    beside the codes (:class:`MaskedLossy`; unbiased). A norm's input is
    coded in the norm's space (:class:`Normalized`), with a 1-bit mask for
    its predicate if it has one (a ReLU output a batch-norm reads: RepVGG);
    without a per-group codec, keep, naming the op that reads the values.
    A reader that needs more bits (fused attention's q and k: 8) raises
    the codec to an integer code of that many bits. (What ``save_predicates``
    saved in place of what the backward read -- a quotient by a normalizer,
    a smooth activation's derivative, a small recomputed norm input -- is
    coded so too; its reason says which.)
12. Read only for its shape: :class:`ShapeOnly`.
13. Read only through one predicate (and shapes): :class:`PredicateMask`.
14. Integer read only as bounded indices: :class:`NarrowInt`.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import NamedTuple

import torch
import torch.fx as fx

from ..codecs import BitMask, Layout, NarrowInt, PackedInt, PredicateMask, Select, ShapeOnly, Unread
from ..codecs.lossless import narrowest_int, packed_bits
from ..codecs.blpa import BLPA, BLPAMask, BLPARelu
from ..codecs.kernels import require_triton
from ..codecs.quant import ClampedAffine, GroupAffine, GroupFP8, MaskedLossy, Normalized, SplitAffine
from ..codecs.uses import (VIEW_OPS, ExactUse, IndexUse, Predicate, PredicateUse, ShapeUse, ValuesUse, uses_of,
                           view_root)
from ..config import BLPA_BITS, LOSSY_BITS, PER_GROUP_CODECS, CompressConfig, Encoders
from ..config import Codec as CodecName
from ..ir import META_KEY, CodecPlan, Decision, Program, SavedTensor, target_name

__all__ = ["plan_codecs"]

#: Keep a one-sided predicate in the integer codes (SplitAffine) under stochastic rounding too.
#: Off: codes forced to their side of the threshold bias the values within a step of it
#: (`bench/grad_bias.py --relu-codes split` measures what that does to the weight gradients).
SPLIT_STOCHASTIC = False
#: Give a clamp's output (ReLU) a reserved code for the clamp value (ClampedAffine) instead of a
#: mask or split codes. A switch for `bench/grad_bias.py --relu-codes clamped mask`, which measures both.
CLAMPED_CODES = True


def plan_codecs(program: Program, config: CompressConfig) -> CodecPlan:
    """Decide, with a reason, what happens to each saved tensor of ``program``."""
    early = {s.index: _decide_early(s, program, config) for s in program.saved}
    if config.codec in BLPA_BITS:
        free = {index for index, decision in early.items() if decision is None}  # what rules 1-3 left alone
        for index, decision in _blpa_decisions(program, BLPA_BITS[config.codec]).items():
            if index in free and (decision.derived_from is None or decision.derived_from in free):
                early[index] = decision
    # NB: the backward reads a tensor through its own placeholder and through
    # those of its aliases (which become views of it), so a codec must serve
    # the uses of all of them.
    readers: dict[int, list[fx.Node]] = {s.index: [s.bw_placeholder] for s in program.saved}
    for s in sorted(program.saved, key=lambda s: -s.index):
        d = early[s.index]
        if d is not None and d.alias_of is not None:
            readers[d.alias_of] += readers[s.index]
    return CodecPlan(
        tuple(early[s.index] or _decide(s, readers[s.index], config) for s in program.saved)
    )


def _decide_early(saved: SavedTensor, program: Program, config: CompressConfig) -> Decision | None:
    """Rules 1-3, which do not look at the backward's uses (rule 4 is ``_blpa_decisions``)."""
    if config.codec is CodecName.NONE:
        return Decision(None, "codec='none'")
    if saved.is_graph_input:
        return Decision(None, "graph input (parameter, buffer or user input): its owner keeps it alive")
    if saved.is_forward_output:
        return Decision(None, "also a forward output: the caller may keep it alive")
    if saved.view_of is not None:
        base = program.saved[saved.view_of].name
        return Decision(None, f"view of saved tensor {base}: stored once", alias_of=saved.view_of)
    return None


def _decide(saved: SavedTensor, readers: list[fx.Node], config: CompressConfig) -> Decision:
    layout = Layout(saved.shape, saved.stride, saved.dtype, saved.device)
    if not any(reader.users for reader in readers):
        return Decision(Unread(layout), _unread(saved))
    if saved.nbytes < config.min_bytes:
        return Decision(None, f"tiny: {saved.nbytes} B < min_bytes={config.min_bytes}")
    if layout.is_dense():
        return _decide_dense(saved, layout, readers, config)
    if layout.overlaps():
        return Decision(None, f"overlapping in memory (stride {saved.stride}): a copy would be larger")
    # NB: a view with gaps (a channel half of shufflenet's split) keeps all of its base's storage
    # alive; its codes cover the view alone, read off a dense copy, and it decodes dense
    decision = _decide_dense(saved, layout.dense(), readers, config)
    if decision.codec is None:
        return decision
    return dataclasses.replace(decision, reason=f"{decision.reason}; coded from a dense copy (stride {saved.stride})")


def _decide_dense(saved: SavedTensor, layout: Layout, readers: list[fx.Node], config: CompressConfig) -> Decision:
    if saved.dtype == torch.bool:
        if saved.added:
            return Decision(BitMask(layout), "a comparison the backward made of recomputed values, "
                                             "saved so that it stays exact: 8 per byte")
        return Decision(BitMask(layout), "bool: 8 per byte")
    constants = _two_constants(saved.fw_node)
    if constants is not None:
        a, b = constants
        return Decision(Select(layout, a, b), f"a select of two constants ({a:g}, {b:g}): 8 per byte")

    uses = [u for reader in readers for _, u in uses_of(reader)]
    exact = [u for u in uses if isinstance(u, ExactUse)]
    if exact:
        ops = ", ".join(sorted({u.op for u in exact}))
        return Decision(None, f"read by {ops}, which needs exact values")
    if _is_rng_state(saved.fw_node):
        return Decision(None, "a random generator's state, saved for a recomputation (activation checkpointing) "
                              "to draw the same numbers: read whole")
    statistic = _statistic_of(saved.fw_node)
    if statistic is not None:
        return Decision(None, f"a normalization statistic (from {statistic}), which needs exact values")
    values = [u for u in uses if isinstance(u, ValuesUse)]
    if values and saved.from_parameters:
        return Decision(None, "computed from parameters alone (e.g. autocast's weight copy): "
                              "input gradients read it, so it stays exact")
    if values:
        ops = ", ".join(sorted({u.op for u in values}))
        decision = _lossy(saved, layout, uses, ops, config)
        if saved.added:  # NB: save_predicates names what it saved
            what = saved.fw_node.meta[META_KEY]["saved_as"]
            return dataclasses.replace(decision, reason=f"{what}: {decision.reason}")
        return decision
    if all(isinstance(u, ShapeUse) for u in uses):
        return Decision(ShapeOnly(layout), "read only for its shape")
    predicates = {u.predicate for u in uses if isinstance(u, PredicateUse)}
    bounds = [u.bound for u in uses if isinstance(u, IndexUse)]
    if predicates and bounds:
        return Decision(None, "read both as indices and through a predicate")
    if predicates:
        if len(predicates) > 1:
            names = ", ".join(sorted(str(p) for p in predicates))
            return Decision(None, f"read through several predicates ({names})")
        (predicate,) = predicates
        reps = predicate.representatives(saved.dtype)
        if reps is None:
            return Decision(None, f"no {saved.dtype} values separate {predicate}")
        return Decision(PredicateMask(layout, predicate, *reps), f"read only as {predicate}")
    bound = min(bounds)
    if saved.dtype.is_floating_point:
        return Decision(None, f"indices < {bound} need all of {saved.dtype}")
    bits = packed_bits(bound)
    if bits is not None:
        return Decision(PackedInt(layout, bits), f"indices < {bound}: {8 // bits} per byte")
    narrow = narrowest_int(bound, saved.dtype)
    if narrow is None:
        return Decision(None, f"indices < {bound} need all of {saved.dtype}")
    return Decision(NarrowInt(layout, narrow), f"indices < {bound}")


# Where a normalization is decomposed before fxcompress sees it (Inductor's
# batch-, layer- and group-norm), its backward reads the statistics through
# plain sub/mul ops, not as a norm backward's save_mean/save_invstd: they are
# found from the forward instead, as what a var_mean (or an RMS norm's
# rsqrt(mean(x^2) + eps)) leads to through casts, views and scalar arithmetic.
_STATISTICS = {torch.ops.aten.var_mean.correction, torch.ops.aten.var.correction}
_ON_A_STATISTIC = {
    torch.ops.prims.convert_element_type.default, torch.ops.aten._to_copy.default,
    torch.ops.aten.rsqrt.default, torch.ops.aten.sqrt.default, torch.ops.aten.reciprocal.default,
    torch.ops.aten.add.Tensor, torch.ops.aten.add.Scalar, torch.ops.aten.mul.Tensor, torch.ops.aten.mul.Scalar,
    operator.getitem, *VIEW_OPS,
}


_SELECTS = {torch.ops.aten.where.self, torch.ops.aten.where.ScalarSelf, torch.ops.aten.where.ScalarOther,
            torch.ops.aten.where.Scalar}


def _two_constants(node: fx.Node) -> tuple[float, float] | None:
    """``(a, b)`` where ``node`` is ``where(c, a, b)`` of two constants, as the values it writes (in
    its dtype, exactly); ``None`` otherwise, or where one bit cannot tell them apart (``0.0, -0.0``)."""
    if node.op != "call_function" or node.target not in _SELECTS:
        return None
    dtype = node.meta["val"].dtype
    if not dtype.is_floating_point:
        return None
    values = [_constant(arg) for arg in node.args[1:3]]
    if any(v is None for v in values):
        return None
    a, b = (v.to(dtype).item() for v in values)
    if a == b or (math.isnan(a) and math.isnan(b)):
        return None
    return a, b


def _constant(arg: object) -> torch.Tensor | None:
    """The value of a constant operand as a 0-d CPU tensor of its own dtype: a Python number, a
    ``full``/``scalar_tensor`` node, or a conversion of one; ``None`` for anything else."""
    if isinstance(arg, (bool, int, float)):
        return torch.tensor(arg, dtype=torch.float64)
    if not isinstance(arg, fx.Node) or arg.op != "call_function":
        return None
    dtype = arg.meta["val"].dtype
    if arg.target in (torch.ops.aten.full.default, torch.ops.aten.scalar_tensor.default):
        value = arg.args[1] if arg.target is torch.ops.aten.full.default else arg.args[0]
        # NB: one rounding of the Python number to the dtype, as the op's own
        return torch.tensor(value, dtype=torch.float64).to(dtype) if isinstance(value, (bool, int, float)) else None
    if arg.target in (torch.ops.prims.convert_element_type.default, torch.ops.aten._to_copy.default):
        inner = _constant(arg.args[0])
        return None if inner is None else inner.to(dtype)
    return None


def _unread(saved: SavedTensor) -> str:
    """Why the backward no longer reads a saved tensor: the two passes that make one unread."""
    node = saved.fw_node
    if node.target is operator.getitem and node.args[1] in (3, 4) and \
            node.args[0].target is torch.ops.aten._native_batch_norm_legit_functional.default:
        # capture.drop_unread_running_stats
        return "a batch norm's updated running statistic, which its training-mode backward never reads"
    return ("no longer read: what the backward computed of it is saved "  # save_predicates
            "(a comparison, a quotient, a derivative, a norm's input)")


def _is_rng_state(node: fx.Node) -> bool:
    """Whether ``node`` is the generator state that ``run_and_save_rng_state`` saved (checkpointed random ops)."""
    saver = getattr(torch.ops.higher_order, "run_and_save_rng_state", None)
    return (node.target is operator.getitem and node.args[1] == 0
            and getattr(node.args[0], "target", None) is saver is not None)


def _statistic_of(node: fx.Node) -> str | None:
    """The reduction a saved normalization statistic comes from (``var_mean``), or ``None``."""
    through_rsqrt = False
    while node.op == "call_function":
        if node.target in _STATISTICS or (through_rsqrt and node.target is torch.ops.aten.mean.dim):
            return target_name(node)
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if node.target not in _ON_A_STATISTIC or len(tensors) != 1:
            return None  # NB: one tensor argument, so add/mul are by a scalar (an eps), not another tensor
        through_rsqrt |= node.target is torch.ops.aten.rsqrt.default
        node = tensors[0]
    return None


_BN_TRAINING_OPS = {
    # op -> position of its ``training`` argument
    torch.ops.aten._native_batch_norm_legit_functional.default: 5,
    torch.ops.aten._native_batch_norm_legit.default: 5,
    torch.ops.aten._native_batch_norm_legit.no_stats: 3,  # track_running_stats=False
    torch.ops.aten.native_batch_norm.default: 5,
}


@dataclasses.dataclass(frozen=True)
class _BatchNorm:
    """A training-mode batch-norm of a saved tensor, as the forward graph computes it."""

    name: str  # for the report: the op, or the decomposition's var_mean
    output: fx.Node  # y = gamma * xhat + beta (before any activation)
    gamma: fx.Node | None  # None, with beta, for a batch-norm without affine parameters: y = xhat
    beta: fx.Node | None
    mean: fx.Node
    invstd: fx.Node

    @property
    def encoder_inputs(self) -> tuple[fx.Node, ...]:
        """What :meth:`BLPA.encode` reads besides the tensor, in its order."""
        affine = (self.gamma, self.beta) if self.gamma is not None else ()
        return (self.output, self.mean, self.invstd, *affine)


def _batch_norm_of(x: fx.Node) -> _BatchNorm | None:
    """The training-mode batch-norm that normalizes ``x``: the aten op (eager backend), or its
    decomposition (Inductor's: ``var_mean`` over all but dim 1, ``(x - mean) * rsqrt(var + eps)``,
    ``* gamma + beta``; through a cast to fp32 under autocast); ``None`` if there is none. Without
    affine parameters ``y = xhat``; with one of the two (``bias=False`` alone is no nn module's), none."""
    for user in x.users:
        if user.target in _BN_TRAINING_OPS and user.args[0] is x and user.args[_BN_TRAINING_OPS[user.target]] is True:
            results = {u.args[1]: u for u in user.users if u.target is operator.getitem}
            gamma, beta = user.args[1], user.args[2]
            if {0, 1, 2} <= results.keys() and isinstance(gamma, fx.Node) == isinstance(beta, fx.Node):
                return _BatchNorm(target_name(user), results[0], gamma, beta, results[1], results[2])
    sources = _fp32_sources(x)
    for src in sources:
        for v in src.users:
            if v.target is torch.ops.aten.var_mean.correction and v.args[0] is src:
                found = _decomposed_batch_norm(sources, v)
                if found is not None:
                    return found
    return None


_CAST = torch.ops.prims.convert_element_type.default


def _fp32_sources(x: fx.Node) -> list[fx.Node]:
    """``x`` and its casts to fp32: under autocast a norm reads the cast."""
    return [x] + [u for u in x.users if u.target is _CAST and u.args[1] == torch.float32]


def _only(node: fx.Node, target: object, other: fx.Node | None = None) -> fx.Node | None:
    """The one user of ``node`` applying ``target`` (to ``other`` as its second operand, if given)."""
    hits = [u for u in node.users if u.target is target and u.args[0] is node
            and (other is None or u.args[1] is other)]
    return hits[0] if len(hits) == 1 else None


def _var_mean_statistics(var_mean: fx.Node, dims: list[int]) -> tuple[fx.Node, fx.Node] | None:
    """``(mean, rsqrt(var + eps))`` of a decomposed norm's ``var_mean`` (biased, keepdim) over
    exactly ``dims`` of its input; ``None`` if it is not one."""
    nd = len(var_mean.args[0].meta["val"].shape)
    reduced = var_mean.args[1] if len(var_mean.args) > 1 else var_mean.kwargs.get("dim")
    if reduced is None or sorted(d % nd for d in reduced) != dims:
        return None
    if var_mean.kwargs.get("correction", 1) != 0 or not var_mean.kwargs.get("keepdim", False):
        return None
    stats = {u.args[1]: u for u in var_mean.users if u.target is operator.getitem}
    if stats.keys() != {0, 1}:
        return None
    eps = _only(stats[0], torch.ops.aten.add.Tensor)
    rstd = eps and _only(eps, torch.ops.aten.rsqrt.default)
    return (stats[1], rstd) if rstd is not None else None


def _decomposed_batch_norm(sources: list[fx.Node], var_mean: fx.Node) -> _BatchNorm | None:
    """``sources``: the saved tensor and its fp32 casts (autocast: ``var_mean`` reads the cast,
    ``x - mean`` may read either)."""
    nd = len(sources[0].meta["val"].shape)
    statistics = _var_mean_statistics(var_mean, [d for d in range(nd) if d != 1]) if nd >= 2 else None
    if statistics is None:
        return None
    mean, invstd = statistics
    centred = next((c for c in (_only(src, torch.ops.aten.sub.Tensor, mean) for src in sources) if c), None)
    xhat = centred and _only(centred, torch.ops.aten.mul.Tensor, invstd)
    if xhat is None:
        return None
    if not any(u.target in (torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor) for u in xhat.users):
        return _BatchNorm("batch-norm (decomposed, no affine)", _uncast(xhat), None, None, mean, invstd)
    channels = sources[0].meta["val"].shape[1]
    # NB: several scalings where batch-norms of one tensor share its statistics: the first
    for scaled in (u for u in xhat.users if u.target is torch.ops.aten.mul.Tensor and u.args[0] is xhat):
        shifted = _only(scaled, torch.ops.aten.add.Tensor)
        if shifted is None or not all(isinstance(a, fx.Node) for a in (scaled.args[1], shifted.args[1])):
            continue
        gamma, beta = view_root(scaled.args[1]), view_root(shifted.args[1])
        if all(g.op == "placeholder" and tuple(g.meta["val"].shape) == (channels,) for g in (gamma, beta)):
            return _BatchNorm("batch-norm (decomposed)", _uncast(shifted), gamma, beta, mean, invstd)
    return None


def _uncast(y: fx.Node) -> fx.Node:
    """The batch-norm output the model reads: under autocast the decomposition computes in fp32 and
    casts y back, and the model (its ReLU) reads the cast."""
    casts = [u for u in y.users if u.target is _CAST]
    return casts[0] if len(y.users) == 1 and casts else y


def _blpa_decisions(program: Program, bits: int) -> dict[int, Decision]:
    """BLPA codes for saved batch-norm inputs, and the saved ReLUs decoded from them."""
    by_node = {s.fw_node: s for s in program.saved}
    out: dict[int, Decision] = {}
    for saved in program.saved:
        if saved.is_graph_input or not saved.dtype.is_floating_point or len(saved.shape) < 2:
            continue
        bn = _batch_norm_of(saved.fw_node)
        layout = Layout(saved.shape, saved.stride, saved.dtype, saved.device)
        if bn is None or not layout.is_dense():
            continue
        codec = BLPA(layout, bits)
        out[saved.index] = Decision(
            codec,
            f"input of {bn.name}: BN-aware {bits}-bit code",
            extra_inputs=bn.encoder_inputs,
        )
        for user in bn.output.users:
            if user.target is not torch.ops.aten.relu.default:
                continue
            relu = by_node.get(user)  # NB: plan_codecs keeps what rules 1-3 decide (a forward output)
            if relu is not None:
                out[relu.index] = Decision(
                    None, f"ReLU of the batch-norm output, decoded from {saved.name}'s code",
                    derived_from=saved.index, derived=BLPARelu(codec, relu.dtype),
                )
            for mask in filter(None, map(by_node.get, user.users)):
                mask_layout = Layout(mask.shape, mask.stride, mask.dtype, mask.device)
                if _relu_mask(mask, user) and mask_layout.is_dense():
                    out[mask.index] = Decision(
                        None, f"the ReLU's mask of the batch-norm output, decoded from {saved.name}'s code",
                        derived_from=saved.index, derived=BLPAMask(codec, mask_layout),
                    )
    return out


_GROUP_NORM = torch.ops.aten.native_group_norm.default
_NORMS = {torch.ops.aten.native_layer_norm.default, _GROUP_NORM}  # NB: their outputs 1 and 2 are mean and rstd
_RESHAPES = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default}


class _Norm(NamedTuple):
    """A norm that reads a saved tensor ``x``: its ``mean`` and ``rstd`` nodes, and ``repeat``, the
    channels per statistic of a group-norm (whose ``(N, G)`` statistics cover ``C / G`` channels
    each; ``None`` for other norms)."""

    name: str
    mean: fx.Node
    rstd: fx.Node
    repeat: int | None = None


def _normalization_of(x: fx.Node) -> _Norm | None:
    """The training-mode batch-norm, layer-norm or group-norm whose input is ``x`` (the aten op, or
    Inductor's decomposition: ``var_mean`` and ``rsqrt(var + eps)``, a group-norm's over ``x`` viewed
    as ``(N, G, C / G, ...)``, through a cast to fp32 under autocast); ``None`` if there is none."""
    bn = _batch_norm_of(x)
    if bn is not None:
        return _Norm(bn.name, bn.mean, bn.invstd)
    shape = tuple(x.meta["val"].shape)
    nd = len(shape)
    for src in _fp32_sources(x):
        for user in src.users:
            if user.target in _NORMS and user.args[0] is src:
                results = {u.args[1]: u for u in user.users if u.target is operator.getitem}
                if {1, 2} <= results.keys():
                    repeat = shape[1] // user.args[6] if user.target is _GROUP_NORM else None  # (x, w, b, N, C, HxW, G, eps)
                    return _Norm(target_name(user), results[1], results[2], repeat)
            if user.target is torch.ops.aten.var_mean.correction and user.args[0] is src:
                reduced = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
                k = len(reduced or ())  # NB: a layer-norm's statistics are over the trailing dims
                statistics = _var_mean_statistics(user, list(range(nd - k, nd))) if k else None
                if statistics is not None:
                    return _Norm("layer-norm (decomposed)", *statistics)
            if user.target in _RESHAPES and user.args[0] is src and nd >= 3:
                grouped = tuple(user.meta["val"].shape)  # NB: (N, G, C / G, H * W), as torch decomposes it
                if len(grouped) < 3 or grouped[0] != shape[0] or grouped[1] * grouped[2] != shape[1]:
                    continue
                for v in user.users:
                    if v.target is torch.ops.aten.var_mean.correction and v.args[0] is user:
                        statistics = _var_mean_statistics(v, list(range(2, len(grouped))))
                        if statistics is not None:
                            return _Norm("group-norm (decomposed)", *statistics, grouped[2])
    return None


def _broadcast_shape(stat: torch.Size, shape: tuple[int, ...], repeat: int | None = None) -> tuple[int, ...]:
    """How a per-row or per-channel statistic of shape ``stat`` broadcasts to ``shape``: as it is where
    it has ``shape``'s rank (keepdim), else ``(1, C, 1, ...)`` (a batch-norm's ``(C,)``); a group-norm's
    (``repeat`` channels per statistic) as ``(N, C, 1, ...)``, once repeated."""
    if repeat is not None:
        return (shape[0], shape[1]) + (1,) * (len(shape) - 2)
    if len(stat) == len(shape):
        return tuple(stat)
    return (1, shape[1]) + (1,) * (len(shape) - 2)


def _shift_into_norm(saved: SavedTensor) -> tuple[fx.Node, _Norm] | tuple[()]:
    """``(p, norm)`` where ``saved`` is an operand of a norm's input ``s + p``, ``p`` a graph input
    smaller than ``s`` that broadcasts to it (a position embedding; the norm's backward then reads
    ``s``'s error as it reads its input's); ``()`` if not."""
    s = saved.fw_node
    for user in s.users:
        if user.target is not torch.ops.aten.add.Tensor or user.kwargs or len(user.args) != 2:
            continue
        p = user.args[1] if user.args[0] is s else user.args[0]
        if (isinstance(p, fx.Node) and p is not s and p.op == "placeholder"
                and p.meta["val"].dtype.is_floating_point and p.meta["val"].numel() < s.meta["val"].numel()
                and user.meta["val"].shape == s.meta["val"].shape):
            norm = _normalization_of(user)
            if norm is not None:
                return p, norm
    return ()


def _relu_mask(mask: SavedTensor, relu: fx.Node) -> bool:
    """Whether ``mask`` is ``relu <= 0`` (a ReLU backward's condition, which ``save_predicates`` saves
    where the backward would recompute the ReLU), for the forward to keep no copy of it."""
    node = mask.fw_node
    return node.target is torch.ops.aten.le.Scalar and node.args[0] is relu and node.args[1] == 0


def _lossy(saved: SavedTensor, layout: Layout, uses: list, ops: str, config: CompressConfig) -> Decision:
    codec = config.blpa_fallback if config.codec in BLPA_BITS else config.codec
    if codec not in PER_GROUP_CODECS:
        if config.codec in BLPA_BITS:
            why = "BLPA codes batch-norm inputs (and the ReLUs of one batch-norm of each), the rest stays exact " \
                  "(blpa_fallback='none')"
        else:
            why = "no lossless encoding applies"
        return Decision(None, f"values read by {ops}; {why}")
    if not saved.dtype.is_floating_point or saved.dtype.itemsize < 2:
        return Decision(None, f"values read by {ops}; {saved.dtype} is not quantized")
    need = max((u.min_bits for u in uses if isinstance(u, ValuesUse)), default=0)
    if need and (codec is CodecName.FP8 or LOSSY_BITS[codec] < need):
        inner = _group_affine(layout, need, config)
        ops = f"{ops} (at least {need}-bit codes there)"
    elif codec is CodecName.FP8:
        inner = GroupFP8(layout, config.fp8_format, config.group_size)
    else:
        inner = _group_affine(layout, LOSSY_BITS[codec], config)
    predicates = {u.predicate for u in uses if isinstance(u, PredicateUse)}
    norm = None if len(predicates) > 1 else _normalization_of(saved.fw_node)
    shift = () if predicates or norm is not None else _shift_into_norm(saved)
    if norm is not None or shift:
        name, mean, rstd, repeat = norm or shift[1]
        fp32 = dataclasses.replace(layout, dtype=torch.float32)
        inner = (_group_affine(fp32, inner.bits, config) if isinstance(inner, GroupAffine)
                 else GroupFP8(fp32, inner.fmt, inner.group))
        stat_shape = _broadcast_shape(mean.meta["val"].shape, saved.shape, repeat)
        p = shift[0].meta["val"] if shift else None
        codec = Normalized(inner, saved.dtype, stat_shape, *((tuple(p.shape), p.dtype) if shift else (None,)),
                           repeat=repeat or 1)
        if isinstance(inner, GroupAffine) and inner.kernel and codec.kernel_index() is None:
            codec = dataclasses.replace(codec, inner=dataclasses.replace(inner, kernel=False))
        why = f"values read by {ops}; coded as {name}'s normalized input" + (f", minus {shift[0].name}" if shift else "")
        if predicates:  # NB: then there is no shift
            # NB: a ReLU output that a norm reads too (RepVGG's identity branch): codes on one scale
            # per channel matter more than the reserved code's saved bit. Where a group spanned
            # channels (small maps), a low-spread channel's xhat was off by a large part of itself,
            # and no branch of such a block has an exact backward, so the errors compounded over the
            # blocks (RepVGG-A0 int4, one step: gradient cosine 0.23 to exact).
            (predicate,) = predicates
            near = _near_values(predicate, saved.dtype)
            if near is None:
                why = f"{why}; no {saved.dtype} values around {predicate}"
            else:
                codec, why = MaskedLossy(codec, predicate, near), f"{why}; {predicate} kept exact"
        return Decision(codec, why, extra_inputs=(mean, rstd, *shift[:1]))
    if len(predicates) == 1:
        (predicate,) = predicates
        near = _near_values(predicate, saved.dtype)
        if near is None:
            return Decision(inner, f"values read by {ops}; no {saved.dtype} values around {predicate}")
        if isinstance(inner, GroupAffine) and CLAMPED_CODES and predicate == _clamp_predicate(saved.fw_node):
            return Decision(ClampedAffine(inner, predicate, near),
                            f"values read by {ops}; {predicate} kept exact by a reserved code")
        if isinstance(inner, GroupAffine) and (SPLIT_STOCHASTIC or not inner.stochastic) and not predicate.two_sided:
            return Decision(SplitAffine(inner, predicate, near), f"values read by {ops}; {predicate} kept exact by the codes")
        return Decision(MaskedLossy(inner, predicate, near), f"values read by {ops}; {predicate} kept exact")
    return Decision(inner, f"values read by {ops}")


def _near_values(predicate: Predicate, dtype: torch.dtype) -> tuple[float, float] | None:
    """:meth:`Predicate.near_values` of ``dtype``, or ``None`` where the dtype has none."""
    try:
        return predicate.near_values(dtype)
    except ValueError:
        return None


def _group_affine(layout: Layout, bits: int, config: CompressConfig) -> GroupAffine:
    """The per-group integer codec of ``config``, its encoder one kernel where ``config.encoders`` says so."""
    kernel = config.encoders is Encoders.TRITON
    if kernel and layout.device.type == "cuda":
        require_triton()
    return GroupAffine(layout, bits, config.group_size, config.stochastic_rounding, kernel)


def _clamp_predicate(node: fx.Node) -> Predicate | None:
    """``le(c)`` for a node that clamps from below at a constant ``c`` (its output is ``c`` wherever that holds)."""
    if node.op != "call_function":
        return None
    if node.target is torch.ops.aten.relu.default:
        return Predicate("le", (0.0,))
    if node.target is torch.ops.aten.clamp_min.default and isinstance(node.args[1], (int, float)):
        return Predicate("le", (float(node.args[1]),))
    return None


def view_chain(node: fx.Node, base: fx.Node) -> list[fx.Node]:
    """The view nodes leading from ``base`` to ``node``, in execution order."""
    chain = []
    while node is not base:
        chain.append(node)
        node = node.args[0]
    return chain[::-1]
