"""The public entry points: ``compile`` and ``explain``.

>>> cm = fxcompress.compile(model, fxcompress.CompressConfig(codec="lossless"), backend="eager")
>>> loss_fn(cm(x), y).backward()
>>> print(fxcompress.explain(cm))
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .capture import CaptureLog, make_backend
from .config import Backend, CompressConfig, LearningRule
from .errors import CaptureError, ConfigError, FxCompressError, NotCapturedError
from .ir import Report, ReportRow
from .passes.auxiliary import apply_asa, buffers_restored
from .passes.buffers import plan_buffers
from .passes.liveness import analyze_liveness

__all__ = ["compile", "explain", "learning_indicator", "CompressedModule"]

_ORIG = "_orig_mod"


def compile(
    model: nn.Module, config: CompressConfig | None = None, *, backend: str | Backend = "inductor"
) -> "CompressedModule":
    """Compile ``model`` so that training steps save compressed activations.

    The forward/backward graphs are captured with ``torch.compile`` on the
    first training-mode call (and again for each new input shape); eval mode
    and ``torch.no_grad()`` run the plain model. The returned module shares
    parameters and buffers with ``model`` and has the same ``state_dict`` keys.
    """
    if not isinstance(model, nn.Module):
        raise FxCompressError(
            f"compile() takes a torch.nn.Module, got {type(model).__name__}; wrap a function "
            f"in an nn.Module whose forward calls it"
        )
    if config is None:
        config = CompressConfig()
    if not isinstance(config, CompressConfig):
        raise ConfigError(f"config={config!r} is not accepted; use fxcompress.CompressConfig(...) or None")
    try:
        backend = Backend(backend)
    except ValueError:
        raise ConfigError(
            f"backend={backend!r} is not accepted; use one of {', '.join(repr(b.value) for b in Backend)}"
        ) from None
    config.check_implemented()
    return CompressedModule(model, config, backend)


class CompressedModule(nn.Module):
    """``model`` with fxcompress applied to its training steps.

    Parameters and buffers are the original module's (one copy), registered
    under ``_orig_mod`` like ``torch.compile``'s wrapper, but ``state_dict``
    and ``load_state_dict`` use the original's keys, so checkpoints move freely
    between the plain and the compressed module.
    """

    def __init__(self, model: nn.Module, config: CompressConfig, backend: Backend) -> None:
        super().__init__()
        self._orig_mod = model
        self.config = config
        self.backend = backend
        self._start_capture()
        self.asa_substitutions: tuple | None = None  # learning_rule="asa": set on the first call
        self._register_state_dict_hook(_strip_prefix)
        self._register_load_state_dict_pre_hook(_add_prefix)

    def _start_capture(self) -> None:
        """An empty capture log and a ``torch.compile`` wrapper of the model (compiled on its first call)."""
        self.capture_log = CaptureLog()
        compiled = torch.compile(
            self._orig_mod,
            backend=make_backend(self.config, self.backend, self.capture_log),
            fullgraph=self.config.fullgraph,
            dynamic=self.config.dynamic,
        )
        # NB: not an attribute nn.Module registers, or parameters would appear twice.
        object.__setattr__(self, "_compiled", compiled)

    # NB: copy.deepcopy (an EMA copy of the model) and pickling (torch.save of the whole module)
    # copy the model, the config and the hooks, not the compiled code and its records: the copy
    # captures and compiles its own graphs on its first training step.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_compiled"], state["capture_log"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._start_capture()

    @property
    def module(self) -> nn.Module:
        """The original, uncompiled model."""
        return self._orig_mod

    # NB: an outer torch.compile (of this module, or of a model holding it) would trace
    # through the compiled model and compile it with its own backend, never fxcompress's:
    # nothing would be compressed. It stops here instead (a graph break) and this
    # module compiles and runs the model itself.
    @torch.compiler.disable
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.config.learning_rule is LearningRule.ASA and self.asa_substitutions is None:
            self.asa_substitutions = apply_asa(self._orig_mod, self.config, args, kwargs)
        if not (self.training and torch.is_grad_enabled()):
            return self._orig_mod(*args, **kwargs)
        seen = _dynamo_gaps()
        try:
            out = self._compiled(*args, **kwargs)
        except FxCompressError:
            raise
        except Exception as e:  # noqa: BLE001 - translated below, never swallowed
            inner = _fxcompress_cause(e)
            if inner is not None:
                raise inner.with_traceback(inner.__traceback__) from None
            if isinstance(e, torch._dynamo.exc.TorchDynamoException):
                cause = _innermost(e)
                first = (str(cause).strip().splitlines() or [""])[0]
                fix = (
                    "if it is a graph break, allow it with CompressConfig(fullgraph=False); otherwise "
                    if self.config.fullgraph else ""
                )
                raise CaptureError(
                    f"torch.compile could not capture {type(self._orig_mod).__name__}: "
                    f"{type(cause).__name__}: {first}\n"
                    f"({fix}errors inside the model's own forward surface here too: run the plain "
                    f"model on the same inputs to see where it fails)"
                ) from e
            raise
        reasons = _new_gaps(seen)
        self.capture_log.note_uncaptured(reasons)
        if not self.capture_log.captures():
            # NB: Dynamo falls back to running the model eagerly when it gives up
            # (e.g. config.recompile_limit reached because many modules share one
            # forward, or an op it cannot trace); training would then silently save everything.
            limit = torch._dynamo.config.recompile_limit
            cause = (
                f"Dynamo gave up on it: {'; '.join(reasons)}"
                if reasons and not any("recompile limit" in r for r in reasons) else
                f"Usual cause: torch._dynamo.config.recompile_limit ({limit}) was reached, e.g. by "
                f"compiling many instances or configs of one model class; raise it or call torch._dynamo.reset()"
            )
            raise CaptureError(
                f"torch.compile ran {type(self._orig_mod).__name__} without capturing a graph, so "
                f"nothing would be compressed. {cause}"
            )
        return out

    def extra_repr(self) -> str:
        return f"config={self.config.describe()}, backend={self.backend.value!r}"


# Dynamo counts, by message, the code it leaves out of its graphs: graph breaks, and frames or
# calls it gives up on (``torch._dynamo.utils.counters``; ``torch._dynamo.explain`` reads them too).
_GAP_COUNTERS = ("graph_break", "unimplemented")


def _dynamo_gaps() -> dict[tuple[str, str], int]:
    """Dynamo's counts of what it left out of its graphs so far, by (counter, message)."""
    from torch._dynamo.utils import counters

    return {(c, m): n for c in _GAP_COUNTERS for m, n in counters[c].items()}


def _new_gaps(seen: dict[tuple[str, str], int]) -> list[str]:
    """The first lines of the messages Dynamo counted since ``seen`` (a :func:`_dynamo_gaps`)."""
    new = [key[1] for key, n in _dynamo_gaps().items() if n > seen.get(key, 0)]
    return list(dict.fromkeys((m.strip().splitlines() or [""])[0] for m in new))


def _innermost(e: BaseException) -> BaseException:
    """The root of Dynamo's chain of wrapped exceptions (the model's own error, usually)."""
    seen = {id(e)}
    while isinstance(e, torch._dynamo.exc.TorchDynamoException):
        # NB: Dynamo re-raises some errors while handling them ``from None``: the real one is __context__.
        nxt = getattr(e, "inner_exception", None) or e.__cause__ or e.__context__
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        e = nxt
    return e


def _fxcompress_cause(e: BaseException) -> FxCompressError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, FxCompressError):
            return e
        e = getattr(e, "inner_exception", None) or e.__cause__
    return None


def _strip_prefix(module, state_dict, prefix, local_metadata):
    inner = prefix + _ORIG + "."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)
    for key in [k for k in getattr(state_dict, "_metadata", {}) if k.startswith(inner) or k == prefix + _ORIG]:
        state_dict._metadata[prefix + key[len(inner):]] = state_dict._metadata.pop(key)
    return state_dict


def _add_prefix(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    inner = prefix + _ORIG + "."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)


def explain(cm: CompressedModule, *, inputs: tuple | None = None) -> Report:
    """What fxcompress did to each saved tensor of ``cm``'s captured graphs.

    Available after the first training-mode forward (capture happens then).
    With ``inputs`` (a batch, as the model's positional arguments) and
    ``learning_rule="ara"`` or ``"asa"``, the report also shows each substituted layer's
    learning indicator on that batch (see :func:`learning_indicator`).
    """
    if not isinstance(cm, CompressedModule):
        raise FxCompressError(
            f"explain() takes the module fxcompress.compile() returned, got {type(cm).__name__}"
        )
    captures = cm.capture_log.captures()
    if not captures:
        raise NotCapturedError(
            "nothing captured yet: run one training-mode forward (model.train(), grad enabled) "
            "through the compiled module, then call explain()"
        )
    rows = []
    for cap in captures:
        encoded_bytes: dict[int, int] = {}
        for s in cap.rewritten.saved:
            encoded_bytes[s.source] = encoded_bytes.get(s.source, 0) + s.nbytes
        for saved, decision in zip(cap.original.saved, cap.plan.decisions):
            codec = codec_label(cap, saved.index)
            if decision.alias_of is not None:
                # NB: a view shares its base's storage; it never cost bytes of its own.
                bytes_before, bytes_after = 0, 0
            elif decision.derived is not None:
                bytes_before, bytes_after = saved.own_bytes, 0
            elif decision.codec is None:
                bytes_before, bytes_after = saved.own_bytes, saved.own_bytes
            else:
                bytes_before, bytes_after = saved.own_bytes, encoded_bytes.get(saved.index, 0)
            if saved.added:
                bytes_before = 0  # NB: plain torch.compile saves none of it: fxcompress's cost, after only
            rows.append(
                ReportRow(
                    program=cap.original.name,
                    name=saved.name,
                    op=saved.op,
                    shape=saved.shape,
                    dtype=str(saved.dtype).removeprefix("torch."),
                    codec=codec,
                    bytes_before=bytes_before,
                    bytes_after=bytes_after,
                    reason=decision.reason,
                    counted=not saved.is_graph_input,
                    module=saved.module,
                    from_parameters=saved.from_parameters,
                )
            )
    notes = []
    uncaptured = cm.capture_log.uncaptured()
    if uncaptured:
        notes.append(
            f"Dynamo left some of the model's code out of its graphs ({'; '.join(uncaptured)}): that code "
            f"runs eagerly, so what it saves for backward, if anything, is neither listed here nor "
            f"compressed (CompressConfig(fullgraph=True) makes this an error)"
        )
    if len(captures) > 1:
        notes.append(f"{len(captures)} captured graphs (graph breaks split the model); totals sum them")
        notes.append("predicted peak with several graphs: all their saved tensors plus the largest transient")
    inductor = cm.backend is Backend.INDUCTOR
    before = [analyze_liveness(cap.before, inductor=inductor) for cap in captures]
    after = [analyze_liveness(cap.rewritten, inductor=inductor) for cap in captures]
    plans = [plan_buffers(live) for live in after]
    return Report(
        config=cm.config.describe(),
        rows=tuple(rows),
        notes=tuple(notes),
        predicted_peak_bytes_before=_step_peak(before),
        predicted_peak_bytes_after=_step_peak(after),
        forward_buffers=sum(len(p.buffers) for p in plans),
        forward_arena_bytes=sum(p.arena_bytes for p in plans),
        forward_naive_bytes=sum(p.naive_bytes for p in plans),
        substitutions=tuple(s for cap in captures for s in cap.substitutions) + (cm.asa_substitutions or ()),
        learning_indicator=learning_indicator(cm, *inputs) if inputs is not None else None,
    )


def learning_indicator(cm: CompressedModule, *inputs: Any) -> dict[str, float]:
    """``LI = 1 - ||x - a||^2 / ||x||^2`` per substituted layer, on one batch.

    ``x`` is the layer's real input and ``a`` the auxiliary activation its
    weight gradient reads instead: under ARA the input of its group's first
    block, under ASA ``asa_lambda * asa_epsilon * sign(h)`` (the layer's real
    input being ``h + asa_epsilon * sign(h)``). 1 is exact backprop, and above 0
    the weight update keeps a descent direction (Woo & Jeon, ICLR 2023). A
    diagnostic: it runs one extra forward of the plain model in training mode
    without gradients, and puts the model's buffers (batch-norm running
    statistics) back after.
    """
    if not isinstance(cm, CompressedModule):
        raise FxCompressError(f"learning_indicator() takes the module fxcompress.compile() returned, got {type(cm).__name__}")
    ara = [s for cap in cm.capture_log.captures() for s in cap.substitutions if s.aux is not None]
    asa = [s.layer for s in cm.asa_substitutions or () if s.aux is not None]
    if not ara and not asa:
        return {}
    model = cm.module
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name in {s.layer for s in ara} | {s.aux_layer for s in ara} | set(asa):
        if name not in modules:
            raise FxCompressError(
                f"learning_indicator(): layer {name!r} of the captured graph is not a submodule of the "
                f"model; the model's modules changed after capture: call it on the model as it was "
                f"compiled, or compile the changed model again with fxcompress.compile()"
            )
        hooks.append(modules[name].register_forward_pre_hook(
            lambda mod, args, name=name: seen.__setitem__(name, args[0].detach().float())))
    try:
        with buffers_restored(model), torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    pairs = {s.layer: (seen[s.layer], seen[s.aux_layer]) for s in ara}
    eps, lam = cm.config.asa_epsilon, cm.config.asa_lambda
    for name in asa:
        h = seen[name]
        s = (h > 0).float() if modules[name].forward.asa_nonneg else torch.where(h > 0, 1.0, -1.0)
        pairs[name] = (h + eps * s, lam * eps * s)
    return {name: float(1 - (x - a).pow(2).sum() / x.pow(2).sum()) for name, (x, a) in pairs.items()}


def codec_label(cap, index: int) -> str:
    """How saved tensor ``index`` of a capture is stored: ``int4``, ``alias(relu)``, ``none``, ..."""
    decision, saved = cap.plan.decisions[index], cap.original.saved
    if decision.alias_of is not None:
        return f"alias({saved[decision.alias_of].name})"
    if decision.derived is not None:
        return f"{decision.derived.name}({saved[decision.derived_from].name})"
    return "none" if decision.codec is None else decision.codec.name


def _step_peak(parts: list) -> int:
    """One graph: its liveness peak. Several: every graph's saved bytes stay live while the
    largest transient (peak minus saved) of any one of them happens."""
    if len(parts) == 1:
        return parts[0].peak_bytes
    return sum(p.saved_bytes for p in parts) + max(p.peak_bytes - p.saved_bytes for p in parts)
