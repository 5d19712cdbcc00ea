"""fxcompress: compress the activations a training step saves for backward.

>>> import fxcompress
>>> cm = fxcompress.compile(model, fxcompress.CompressConfig(codec="lossless"))
>>> loss_fn(cm(x), y).backward()           # train as usual
>>> print(fxcompress.explain(cm))          # what was saved, and how
"""
import torch

from .errors import UnsupportedError

MIN_TORCH = "2.11"


def _require_torch(version: str) -> None:
    """Refuse a torch older than the oldest fxcompress is tested on, before anything uses its APIs."""
    if torch.torch_version.TorchVersion(version) < MIN_TORCH:
        raise UnsupportedError(
            f"fxcompress needs torch>={MIN_TORCH} (it relies on Inductor's custom_partitioner_fn and the "
            f"AOTAutograd partition hooks of that release); found torch {version}. "
            f"Upgrade with: pip install 'torch>={MIN_TORCH}'"
        )


_require_torch(torch.__version__)

from . import visualize  # noqa: E402  (after the version check, which guards their imports)
from .api import CompressedModule, compile, explain, learning_indicator  # noqa: E402
from .config import Backend, BasePartitioner, Codec, CompressConfig, Encoders, LearningRule  # noqa: E402
from .errors import (  # noqa: E402
    CaptureError,
    ConfigError,
    FxCompressError,
    InternalError,
    NotCapturedError,
    UnsupportedError,
)
from .ir import Report, ReportRow  # noqa: E402

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
    "Encoders",
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
    "MIN_TORCH",
]
