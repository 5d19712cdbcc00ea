import pytest
import torch.nn as nn

import fxcompress
from fxcompress import CompressConfig


@pytest.mark.parametrize(
    "field, value, accepted",
    [
        ("codec", "int3", "'int8'"),
        ("learning_rule", "hebbian", "'ara'"),
        ("base_partitioner", "greedy", "'min_cut'"),
        ("min_bytes", -1, "int >= 0"),
        ("min_bytes", 1.5, "int >= 0"),
        ("fullgraph", "yes", "True or False"),
        ("dynamic", 1, "True or False"),
        ("stochastic_rounding", None, "True or False"),
        ("group_size", 100, "multiple of 8"),
        ("group_size", 0, "multiple of 8"),
        ("fp8_format", "e3m4", "'e4m3', 'e5m2'"),
    ],
)
def test_bad_config_value_names_field_value_and_accepted(field, value, accepted):
    with pytest.raises(fxcompress.ConfigError) as info:
        CompressConfig(**{field: value})
    msg = str(info.value)
    assert field in msg and repr(value) in msg and accepted in msg
    assert isinstance(info.value, fxcompress.FxCompressError) and isinstance(info.value, ValueError)


def test_config_is_frozen_and_normalized():
    cfg = CompressConfig(codec="none", learning_rule="backprop")
    assert cfg.codec is fxcompress.Codec.NONE
    with pytest.raises(AttributeError):
        cfg.codec = "lossless"
    assert CompressConfig(codec="lossless") == CompressConfig(codec=fxcompress.Codec.LOSSLESS)
    assert "codec='lossless'" in CompressConfig().describe()


def test_compile_rejects_non_module():
    with pytest.raises(fxcompress.FxCompressError, match="torch.nn.Module.*got function"):
        fxcompress.compile(lambda x: x)


def test_compile_rejects_bad_backend_and_config():
    with pytest.raises(fxcompress.ConfigError, match="backend='tvm'.*'inductor', 'eager'"):
        fxcompress.compile(nn.Linear(2, 2), backend="tvm")
    with pytest.raises(fxcompress.ConfigError, match="CompressConfig"):
        fxcompress.compile(nn.Linear(2, 2), {"codec": "int4"})


def test_explain_before_capture_and_on_wrong_type():
    cm = fxcompress.compile(nn.Linear(2, 2), backend="eager")
    with pytest.raises(fxcompress.NotCapturedError, match="training-mode forward"):
        fxcompress.explain(cm)
    with pytest.raises(fxcompress.FxCompressError, match="fxcompress.compile"):
        fxcompress.explain(nn.Linear(2, 2))


def test_older_torch_is_refused_at_import_with_the_fix():
    import subprocess
    import sys

    code = "import torch; torch.__version__ = '2.10.0+cpu'; import fxcompress"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "UnsupportedError" in done.stderr
    assert "needs torch>=2.11" in done.stderr and "found torch 2.10.0+cpu" in done.stderr
    assert "pip install 'torch>=2.11'" in done.stderr
    assert fxcompress.MIN_TORCH == "2.11"
