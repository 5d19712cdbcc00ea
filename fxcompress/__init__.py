"""fxcompress: compress the activations a training step saves for backward.

>>> import fxcompress
>>> cm = fxcompress.compile(model, fxcompress.CompressConfig(codec="lossless"))
>>> loss_fn(cm(x), y).backward()           # train as usual
>>> print(fxcompress.explain(cm))          # what was saved, and how
"""
from . import visualize
from .api import CompressedModule, compile, explain, learning_indicator
from .config import Backend, BasePartitioner, Codec, CompressConfig, LearningRule
from .errors import (
    CaptureError,
    ConfigError,
    FxCompressError,
    InternalError,
    NotCapturedError,
    UnsupportedError,
)
from .ir import Report, ReportRow

__version__ = "0.1.0"

__all__ = [
    "compile",
    "explain",
    "learning_indicator",
    "CompressedModule",
    "CompressConfig",
    "Codec",
    "LearningRule",
    "Backend",
    "BasePartitioner",
    "Report",
    "ReportRow",
    "FxCompressError",
    "ConfigError",
    "CaptureError",
    "NotCapturedError",
    "UnsupportedError",
    "InternalError",
    "visualize",
    "__version__",
]
