"""Golden text of the rewritten graphs and the plan; update with FXCOMPRESS_UPDATE_GOLDENS=1."""
import pathlib

import pytest

import fxcompress
from fxcompress import testing
from conftest import compressed, make_model, train_step

GOLDENS = pathlib.Path(__file__).parent / "goldens"


@pytest.mark.parametrize("name", ["mlp", "convnet"])
def test_rewritten_graphs_match_golden(name):
    model, x = make_model(name)
    step = train_step(model, x, compressed("lossless"))
    testing.assert_matches_golden(testing.compiled_text(step.module), GOLDENS / f"{name}_lossless.txt")


def test_ara_rewritten_graphs_match_golden():
    """ARA's substitution, pinned: stage1.1.conv1 and stage2.0's convs read getitem_5."""
    model, x = make_model("resnet")
    step = train_step(model, x, compressed("lossless", learning_rule="ara", ara_stride=3))
    text = testing.compiled_text(step.module)
    testing.assert_matches_golden(text, GOLDENS / "resnet_ara_lossless.txt")


def test_graph_text_is_stable_across_compiles():
    texts = []
    for _ in range(2):
        model, x = make_model("convnet")
        texts.append(testing.compiled_text(train_step(model, x, compressed("lossless")).module))
    assert texts[0] == texts[1]
    assert "# encode bitmask" in texts[0] and "# decode bitmask" in texts[0]


def test_golden_mismatch_shows_a_diff_and_update_writes(tmp_path):
    path = tmp_path / "g.txt"
    with pytest.raises(AssertionError, match="does not exist.*FXCOMPRESS_UPDATE_GOLDENS=1"):
        testing.assert_matches_golden("a\n", path, update=False)
    testing.assert_matches_golden("a\nb\n", path, update=True)
    testing.assert_matches_golden("a\nb\n", path, update=False)
    with pytest.raises(AssertionError, match=r"(?s)differs from golden.*-b\n\+c"):
        testing.assert_matches_golden("a\nc\n", path, update=False)


def test_update_switch_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "g.txt"
    monkeypatch.setenv(testing.UPDATE_ENV, "1")
    testing.assert_matches_golden("x\n", path)
    assert path.read_text() == "x\n"


def test_compiled_text_before_capture():
    cm = fxcompress.compile(make_model("mlp")[0], backend="eager")
    with pytest.raises(fxcompress.NotCapturedError):
        testing.compiled_text(cm)
