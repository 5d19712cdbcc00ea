"""The memory timeline: deterministic DOT (golden), real rendering, clear errors."""
import pathlib
import shutil
import subprocess
import sys

import pytest

import fxcompress
from fxcompress import testing
from conftest import compressed, make_model, train_step

GOLDENS = pathlib.Path(__file__).parent / "goldens"


def _compiled(name, codec="lossless"):
    model, x = make_model(name)
    return train_step(model, x, compressed(codec)).module


@pytest.mark.parametrize("name", ["mlp", "convnet"])
def test_dot_matches_golden(name):
    dot = fxcompress.visualize.timeline_dot(_compiled(name))
    testing.assert_matches_golden(dot, GOLDENS / f"{name}_timeline.dot")


def test_dot_is_deterministic_and_shows_before_after_peak_and_legend():
    a = fxcompress.visualize.timeline_dot(_compiled("resnet", "int4"))
    b = fxcompress.visualize.timeline_dot(_compiled("resnet", "int4"))
    assert a == b
    assert "before the rewrite" in a and "after the rewrite" in a
    assert "predicted peak" in a and ">P<" in a and "legend" in a
    assert 'BGCOLOR="#5c6bc0"' in a  # int4 lanes carry int4's colour


def test_many_lanes_fold_by_module():
    cm = _compiled("resnet", "int4")
    few = fxcompress.visualize.timeline_dot(cm, max_lanes=8)
    many = fxcompress.visualize.timeline_dot(cm, max_lanes=1000)
    assert few.count("<TR>") < many.count("<TR>")
    assert "stage1" in few


@pytest.mark.skipif(shutil.which("dot") is None, reason="needs Graphviz's dot (README's test command installs it)")
def test_renders_png_and_svg(tmp_path):
    cm = _compiled("convnet", "int4")
    png = fxcompress.visualize.timeline(cm, tmp_path / "t.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = fxcompress.visualize.timeline(cm, tmp_path / "t.svg")
    assert "<svg" in svg.read_text()


def test_without_dot_writes_the_dot_and_says_how(tmp_path, monkeypatch):
    cm = _compiled("mlp")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.warns(UserWarning, match=r"dot -Tsvg .*t\.dot -o .*t\.svg"):
        written = fxcompress.visualize.timeline(cm, tmp_path / "t.svg")
    assert written.suffix == ".dot" and written.read_text().startswith("digraph")


def test_bad_format_and_nothing_captured(tmp_path):
    cm = _compiled("mlp")
    with pytest.raises(fxcompress.FxCompressError, match="unknown format '.jpg'"):
        fxcompress.visualize.timeline(cm, tmp_path / "t.jpg")
    fresh = fxcompress.compile(make_model("mlp")[0], backend="eager")
    with pytest.raises(fxcompress.NotCapturedError):
        fxcompress.visualize.timeline_dot(fresh)


def test_cli_visualize(tmp_path):
    out = tmp_path / "step.dot"
    run = subprocess.run(
        [sys.executable, "-m", "fxcompress", "visualize", "fxcompress.models:ConvNet", "--input", "4x3x16x16",
         "--codec", "int4", "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert out.read_text().startswith("digraph") and "drawing" in run.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "fxcompress", "visualize", "fxcompress.models:ConvNet", "--input", "4x3x16x16",
         "-o", str(tmp_path / "x.jpg")], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "unknown format '.jpg'" in bad.stderr and "capturing" not in bad.stderr
