"""`CompressConfig`: what to compress and how, validated on construction.

>>> CompressConfig(codec="lossless").codec
<Codec.LOSSLESS: 'lossless'>
"""
from __future__ import annotations

import dataclasses
import enum
import math

from .errors import ConfigError, UnsupportedError

__all__ = ["Codec", "LearningRule", "Backend", "BasePartitioner", "Encoders", "CompressConfig"]


class Codec(str, enum.Enum):
    """The codec family applied to saved tensors.

    ``none`` saves everything as PyTorch would; ``lossless`` applies only the
    encodings that keep gradients bit-identical (bit-packed masks, narrowed
    indices, alias de-duplication). Every lossy codec applies the lossless
    encodings where they fit, and quantizes what is left.
    """

    NONE = "none"
    LOSSLESS = "lossless"
    INT8 = "int8"
    INT4 = "int4"
    INT2 = "int2"
    BLPA8 = "blpa8"
    BLPA4 = "blpa4"
    FP8 = "fp8"


class LearningRule(str, enum.Enum):
    """How weight gradients are formed: exact ``backprop`` or the AAL rules."""

    BACKPROP = "backprop"
    ARA = "ara"
    ASA = "asa"


class Backend(str, enum.Enum):
    """What runs the rewritten graphs: ``inductor`` compiles them, ``eager`` runs them as they are."""

    INDUCTOR = "inductor"
    EAGER = "eager"


class Encoders(str, enum.Enum):
    """How the integer codecs' encoders run: ``aten`` ops Inductor fuses, or one ``triton`` kernel each."""

    ATEN = "aten"
    TRITON = "triton"


class BasePartitioner(str, enum.Enum):
    """PyTorch's partitioner that decides what is saved before fxcompress rewrites it.

    ``auto`` uses min-cut for the Inductor backend and the default
    partitioner (what ``aot_eager`` uses) for the eager backend.
    """

    AUTO = "auto"
    MIN_CUT = "min_cut"
    DEFAULT = "default"


# Codecs and rules that this version implements. The others are accepted
# names of the public contract and fail with UnsupportedError at compile time.
IMPLEMENTED_CODECS = frozenset(
    {Codec.NONE, Codec.LOSSLESS, Codec.INT8, Codec.INT4, Codec.INT2, Codec.FP8, Codec.BLPA8, Codec.BLPA4}
)
LOSSY_BITS = {Codec.INT8: 8, Codec.INT4: 4, Codec.INT2: 2}
BLPA_BITS = {Codec.BLPA8: 8, Codec.BLPA4: 4}
PER_GROUP_CODECS = (Codec.INT8, Codec.INT4, Codec.INT2, Codec.FP8)
FP8_FORMATS = ("e4m3", "e5m2")
IMPLEMENTED_RULES = frozenset({LearningRule.BACKPROP, LearningRule.ARA, LearningRule.ASA})


def _coerce(cls: type[enum.Enum], field: str, value: object) -> enum.Enum:
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        accepted = ", ".join(repr(m.value) for m in cls)
        raise ConfigError(f"{field}={value!r} is not accepted; use one of {accepted}") from None


@dataclasses.dataclass(frozen=True)
class CompressConfig:
    """What fxcompress does to the tensors a training step saves for backward.

    Fields:
        codec: codec family, see :class:`Codec` (default ``"lossless"``).
        learning_rule: ``"backprop"`` (exact gradients), ``"ara"`` or ``"asa"``.
        min_bytes: saved tensors smaller than this stay as they are
            (batch-norm statistics, RNG seeds, scalars): encoding them costs
            more launches than it saves bytes. Default 1024.
        base_partitioner: PyTorch's partitioner run before the rewrite,
            see :class:`BasePartitioner`. Default ``"auto"``.
        fullgraph: passed to ``torch.compile``; with ``True`` a graph break
            is a :class:`~fxcompress.CaptureError` instead of a split graph.
        dynamic: passed to ``torch.compile``. Default ``False``: a new input
            shape (say, the last, smaller batch) compiles a new graph. ``True``
            works with ``codec="none"`` and backprop only: the codecs are
            traced for static shapes (:class:`UnsupportedError` otherwise).
        group_size: elements per quantization group (consecutive in memory),
            each with its own range; a multiple of 8. Default 256 (ActNN's).
        stochastic_rounding: unbiased stochastic rounding for the integer
            codecs (default ``True``); ``False`` rounds to nearest.
            Reproducible under ``torch.manual_seed``.
        encoders: how the integer codecs' encoders run. ``"aten"`` (default):
            as aten ops spliced into the forward graph, which Inductor fuses
            and generates code for like any other. ``"triton"``: each one
            ``fxcompress.affine_encode`` op, one hand-written Triton kernel on
            CUDA (the same codes, in one pass over the tensor, and nothing
            for Inductor to compile; see ``fxcompress/codecs/kernels.py``);
            on other devices the op runs the aten code. Stochastic rounding's
            draws are then made inside the kernel: other numbers than the
            aten path's, as unbiased, and reproducible under ``torch.manual_seed``.
        fp8_format: ``"e4m3"`` (default, more precision) or ``"e5m2"`` (more range).
        blpa_fallback: with ``blpa8``/``blpa4``, the per-group codec for saved
            tensors that do not feed a batch-norm (``"none"``, the paper's
            choice, keeps them in full precision after the lossless encodings;
            or ``"int8"``, ``"int4"``, ``"int2"``, ``"fp8"``).
        ara_stride: with ``learning_rule="ara"``, how many consecutive
            same-shape block inputs share one stored activation (the paper's
            "ARA stride"). An int for every residual chain (a chain: blocks
            with identity shortcuts, ending at a shape change), or a tuple
            with one int per chain in forward order (ResNet-50's four stages:
            e.g. ``(3, 4, 2, 2)``). 1 substitutes nothing. Default 2.
        asa_epsilon, asa_lambda: with ``learning_rule="asa"``, the forward
            uses ``h + asa_epsilon * sign(h)`` and the weight gradient is
            ``asa_lambda * (asa_epsilon * sign(h))^T delta``. Defaults 0.01
            and 100 (the paper's).
        asa_layers: which linear layers ASA changes: ``"after_activation"``
            (default: every ``nn.Linear``, GPT-2 ``Conv1D`` or 1x1, stride-1,
            ungrouped ``nn.Conv2d`` whose input is an activation's output,
            possibly through dropout: the FFN's second linear, the paper's
            ASA1), or a tuple of ``fnmatch``
            patterns of module paths (e.g. ``("*.mlp.c_fc", "*.mlp.c_proj")``
            for ASA2 on GPT-2).
    """

    codec: Codec | str = Codec.LOSSLESS
    learning_rule: LearningRule | str = LearningRule.BACKPROP
    min_bytes: int = 1024
    base_partitioner: BasePartitioner | str = BasePartitioner.AUTO
    fullgraph: bool = False
    dynamic: bool = False
    group_size: int = 256
    stochastic_rounding: bool = True
    fp8_format: str = "e4m3"
    encoders: Encoders | str = Encoders.ATEN
    blpa_fallback: Codec | str = Codec.NONE
    ara_stride: int | tuple[int, ...] = 2
    asa_epsilon: float = 0.01
    asa_lambda: float = 100.0
    asa_layers: str | tuple[str, ...] = "after_activation"

    def __post_init__(self) -> None:
        # NB: frozen dataclass, so normalized values go in through object.__setattr__.
        object.__setattr__(self, "codec", _coerce(Codec, "codec", self.codec))
        object.__setattr__(
            self, "learning_rule", _coerce(LearningRule, "learning_rule", self.learning_rule)
        )
        object.__setattr__(
            self,
            "base_partitioner",
            _coerce(BasePartitioner, "base_partitioner", self.base_partitioner),
        )
        if isinstance(self.min_bytes, bool) or not isinstance(self.min_bytes, int) or self.min_bytes < 0:
            raise ConfigError(
                f"min_bytes={self.min_bytes!r} is not accepted; use an int >= 0 (bytes)"
            )
        fallback = _coerce(Codec, "blpa_fallback", self.blpa_fallback)
        if fallback is not Codec.NONE and fallback not in PER_GROUP_CODECS:
            raise ConfigError(
                f"blpa_fallback={self.blpa_fallback!r} is not accepted; use one of 'none', "
                + ", ".join(repr(c.value) for c in PER_GROUP_CODECS)
            )
        object.__setattr__(self, "blpa_fallback", fallback)
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g <= 0 or g % 8:
            raise ConfigError(f"group_size={g!r} is not accepted; use a positive multiple of 8 (e.g. 256)")
        if self.fp8_format not in FP8_FORMATS:
            raise ConfigError(
                f"fp8_format={self.fp8_format!r} is not accepted; use one of "
                + ", ".join(repr(f) for f in FP8_FORMATS)
            )
        object.__setattr__(self, "encoders", _coerce(Encoders, "encoders", self.encoders))
        stride = self.ara_stride
        if isinstance(stride, list):
            stride = tuple(stride)
            object.__setattr__(self, "ara_stride", stride)
        strides = stride if isinstance(stride, tuple) else (stride,)
        if not strides or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in strides):
            raise ConfigError(
                f"ara_stride={self.ara_stride!r} is not accepted; use an int >= 1 or a non-empty "
                f"tuple of ints >= 1, one per residual chain (e.g. (3, 4, 2, 2))"
            )
        for name in ("asa_epsilon", "asa_lambda"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name}={v!r} is not accepted; use a finite number > 0")
            object.__setattr__(self, name, float(v))
        layers = self.asa_layers
        if isinstance(layers, list):
            layers = tuple(layers)
            object.__setattr__(self, "asa_layers", layers)
        if not (layers == "after_activation" or (
                isinstance(layers, tuple) and layers and all(isinstance(p, str) and p for p in layers))):
            raise ConfigError(
                f"asa_layers={self.asa_layers!r} is not accepted; use 'after_activation' or a non-empty "
                f"tuple of module-path patterns (fnmatch), e.g. ('*.mlp.c_fc', '*.mlp.c_proj')"
            )
        for name in ("fullgraph", "dynamic", "stochastic_rounding"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"{name}={getattr(self, name)!r} is not accepted; use True or False"
                )

    def check_implemented(self) -> None:
        """Raise :class:`UnsupportedError` for contract names this version cannot run yet."""
        if self.codec not in IMPLEMENTED_CODECS:
            have = ", ".join(repr(c.value) for c in Codec if c in IMPLEMENTED_CODECS)
            raise UnsupportedError(
                f"codec={self.codec.value!r} is a valid codec name but is not implemented in "
                f"this version of fxcompress; implemented: {have}"
            )
        if self.dynamic and (self.codec is not Codec.NONE or self.learning_rule is not LearningRule.BACKPROP):
            raise UnsupportedError(
                f"dynamic=True works with codec='none' and learning_rule='backprop' only in this version "
                f"(here codec={self.codec.value!r}, learning_rule={self.learning_rule.value!r}): a codec's "
                f"encoder and decoder are traced for each saved tensor's static shape. Use dynamic=False "
                f"(the default): a new input shape, such as an epoch's last, smaller batch, compiles once more"
            )
        if self.learning_rule not in IMPLEMENTED_RULES:
            raise UnsupportedError(
                f"learning_rule={self.learning_rule.value!r} is a valid rule name but is not "
                f"implemented in this version of fxcompress; implemented: "
                + ", ".join(repr(r.value) for r in LearningRule if r in IMPLEMENTED_RULES)
            )

    def describe(self) -> str:
        """A stable one-line form, used in cache keys and reports."""
        parts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            parts.append(f"{f.name}={v.value if isinstance(v, enum.Enum) else v!r}")
        return "CompressConfig(" + ", ".join(parts) + ")"
