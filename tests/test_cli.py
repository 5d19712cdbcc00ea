"""The command line, run as a user runs it (a subprocess)."""
import subprocess
import sys

import pytest

from fxcompress.cli import CliError, load_factory, parse_input
from fxcompress.config import IMPLEMENTED_CODECS


def run(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "fxcompress", *args], capture_output=True, text=True, timeout=timeout
    )


def test_demo_runs_end_to_end():
    out = run("demo", "--steps", "1", "--report", "int4")
    assert out.returncode == 0, out.stderr[-3000:]
    codecs = sorted(c.value for c in IMPLEMENTED_CODECS)
    for model in ("ResidualCNN", "TinyTransformer"):
        table = out.stdout.split(f"### {model}")[1].split("per saved tensor")[0]
        for codec in codecs:
            assert f"\n{codec} " in table, f"{model}: no summary row for {codec}"
    assert out.stdout.count("per saved tensor, codec=int4:") == 2
    assert out.stdout.count("saved for backward:") == 2
    assert "compile + step 1/1" in out.stderr  # progress is shown


def test_explain_a_factory_with_float_and_token_inputs():
    out = run("explain", "fxcompress.models:ConvNet", "--input", "4x3x16x16", "--codec", "int4", "--autocast", "bf16")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "narrow[uint8]" in out.stdout and "saved for backward:" in out.stdout
    assert "bfloat16  int4" in out.stdout  # mixed precision: bf16 activations, quantized
    out = run("explain", "fxcompress.models:TinyTransformer", "--input", "int:2x32:96", "--codec", "none")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "codec='none'" in out.stdout


def test_bad_arguments_fail_cleanly():
    # one real process for the entry point's exit status; tests/test_errors.py checks every message in-process
    out = run("explain", "no_such_module:f", "--input", "2x3")
    assert out.returncode == 2
    assert "fxcompress: error: cannot import 'no_such_module'" in out.stderr
    assert "Traceback" not in out.stderr


def test_parse_input_and_load_factory():
    assert parse_input("2x3x4").shape == (2, 3, 4)
    ids = parse_input("int:3x5:7")
    assert ids.shape == (3, 5) and int(ids.max()) < 7 and not ids.is_floating_point()
    for bad in ("", "0x3", "int:2x3:0", "3-4"):
        with pytest.raises(CliError):
            parse_input(bad)
    assert load_factory("fxcompress.models:MLP").__name__ == "MLP"


def test_set_reads_config_fields_as_literals(capsys):
    from fxcompress.cli import main, parse_settings

    assert parse_settings(["group_size=64", "ara-stride=3,4,2,2", "stochastic_rounding=False",
                           "asa_epsilon=0.02", "blpa_fallback=int4"]) == {
        "group_size": 64, "ara_stride": (3, 4, 2, 2), "stochastic_rounding": False,
        "asa_epsilon": 0.02, "blpa_fallback": "int4"}
    assert main(["explain", "fxcompress.models:MLP", "--input", "4x64", "--codec", "int4",
                 "--set", "group_size=64", "--set", "stochastic_rounding=False"]) == 0
    out = capsys.readouterr().out
    assert "group_size=64, stochastic_rounding=False" in out and "int4/det" in out
