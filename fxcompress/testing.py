"""Golden-graph helpers: pin what fxcompress does to a model in a regression test.

>>> cm = fxcompress.compile(model, config, backend="eager")
>>> cm.train(); cm(x).sum().backward()
>>> fxcompress.testing.assert_matches_golden(fxcompress.testing.compiled_text(cm), "goldens/model.txt")

The text is normalized so that it changes only when the graphs or the plan
change: nodes are renumbered in order (``%0, %1, ...``), every node shows
its op, arguments, shape and dtype, and nodes fxcompress inserted show their
role (``encode``/``decode``/``alias``) and codec.

Goldens are updated by setting ``FXCOMPRESS_UPDATE_GOLDENS=1`` (or passing
``update=True``); the test then writes the file instead of comparing.
"""
from __future__ import annotations

import difflib
import os
import pathlib
from typing import Any

import torch
import torch.fx as fx

from .api import CompressedModule, explain
from .errors import NotCapturedError
from .ir import META_KEY, target_name

__all__ = ["graph_text", "plan_text", "compiled_text", "assert_matches_golden", "UPDATE_ENV"]

#: environment variable that switches golden comparison to golden writing
UPDATE_ENV = "FXCOMPRESS_UPDATE_GOLDENS"


def graph_text(gm: fx.GraphModule | fx.Graph) -> str:
    """A normalized, stable text form of one graph."""
    graph = gm.graph if isinstance(gm, fx.GraphModule) else gm
    names: dict[fx.Node, str] = {}
    lines = []
    for i, node in enumerate(graph.nodes):
        names[node] = f"%{i}"
        if node.op == "output":
            lines.append(f"return {_fmt(node.args[0], names)}")
            continue
        what = "input" if node.op == "placeholder" else f"{_op(node)}({_args(node, names)})"
        tag = node.meta.get(META_KEY)
        note = f"  # {tag['role']} {tag.get('codec', '')}".rstrip() if tag else ""
        lines.append(f"%{i}: {_val(node.meta.get('val'))} = {what}{note}")
    return "\n".join(lines) + "\n"


def plan_text(cm: CompressedModule) -> str:
    """One line per saved tensor: graph, op, shape, dtype, codec, bytes before/after, reason."""
    report = explain(cm)
    lines = [report.config]
    for r in report.rows:
        shape = "x".join(map(str, r.shape)) or "scalar"
        star = "" if r.counted else " (graph input)"
        lines.append(
            f"{r.program} {r.op} {shape} {r.dtype} -> {r.codec} {r.bytes_before}->{r.bytes_after}{star}: {r.reason}"
        )
    lines.append(f"total {report.saved_bytes_before}->{report.saved_bytes_after}")
    return "\n".join(lines) + "\n"


def compiled_text(cm: CompressedModule) -> str:
    """The plan and every rewritten forward/backward graph of ``cm``."""
    captures = cm.capture_log.captures()
    if not captures:
        raise NotCapturedError("nothing captured yet: run one training-mode forward first")
    parts = [plan_text(cm)]
    for cap in captures:
        parts.append(f"== {cap.rewritten.name} forward\n{graph_text(cap.rewritten.fw)}")
        parts.append(f"== {cap.rewritten.name} backward\n{graph_text(cap.rewritten.bw)}")
    return "\n".join(parts)


def assert_matches_golden(text: str, path: str | os.PathLike, *, update: bool | None = None) -> None:
    """Compare ``text`` with the golden file at ``path``; write it instead when updating.

    Raises ``AssertionError`` with a unified diff on a mismatch, and on a
    missing golden (with the command that creates it).
    """
    path = pathlib.Path(path)
    if update is None:
        update = os.environ.get(UPDATE_ENV, "") not in ("", "0")
    if update:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    if not path.exists():
        raise AssertionError(f"golden file {path} does not exist; create it with {UPDATE_ENV}=1")
    expected = path.read_text()
    if expected != text:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(True), text.splitlines(True), f"{path} (golden)", "actual", n=2
            )
        )
        raise AssertionError(
            f"output differs from golden {path}; if the change is intended, rerun with {UPDATE_ENV}=1\n{diff}"
        )


def _op(node: fx.Node) -> str:
    if isinstance(node.target, torch._ops.OpOverload):
        ns = node.target.namespace
        return f"{ns}.{target_name(node)}"
    return target_name(node)


def _val(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        dtype = str(val.dtype).removeprefix("torch.")
        return f"{dtype}[{','.join(map(str, val.shape))}]"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(_val(v) for v in val) + ")"
    return type(val).__name__ if val is not None else "?"


def _args(node: fx.Node, names: dict[fx.Node, str]) -> str:
    parts = [_fmt(a, names) for a in node.args]
    parts += [f"{k}={_fmt(v, names)}" for k, v in sorted(node.kwargs.items())]
    return ", ".join(parts)


def _fmt(x: Any, names: dict[fx.Node, str]) -> str:
    if isinstance(x, fx.Node):
        return names[x]
    if isinstance(x, (tuple, list)):
        inner = ", ".join(_fmt(v, names) for v in x)
        return f"[{inner}]" if isinstance(x, list) else f"({inner})"
    if isinstance(x, torch.dtype):
        return str(x).removeprefix("torch.")
    if isinstance(x, torch.device):
        return x.type
    if isinstance(x, float):
        return repr(x)
    return str(x)
