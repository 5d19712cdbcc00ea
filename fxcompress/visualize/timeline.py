"""Graphviz memory timeline: ``timeline(cm, "step.svg")``.

For each captured graph, two panels, before and after the rewrite: time runs
left to right over the step (forward, then backward, in ``buckets``
columns); each lane is a saved tensor (grouped by module when there are more
than ``max_lanes``) or a shared forward buffer, filled where it is live and
coloured by codec; the top row shades live bytes per column and marks the
peak. A legend names the codecs' colours.

The DOT text is deterministic (sorted lanes, colours fixed per codec
family), so it can be golden-tested. Writing ``.svg``/``.png``/``.pdf`` needs
Graphviz's ``dot`` program; without it the ``.dot`` file is written and a
warning says how to render it.
"""
from __future__ import annotations

import dataclasses
import html
import pathlib
import shutil
import subprocess
import warnings
from typing import TYPE_CHECKING

from ..config import Backend
from ..errors import FxCompressError, NotCapturedError
from ..passes.buffers import plan_buffers
from ..passes.liveness import Liveness, analyze_liveness
from .report import format_bytes

if TYPE_CHECKING:
    from ..api import CompressedModule

__all__ = ["timeline", "timeline_dot", "output_format"]

_COLORS = {  # codec family -> fill colour
    "none": "#9e9e9e", "alias": "#d0d0d0", "shape-only": "#e8e8e8", "bitmask": "#66bb6a",
    "mask": "#2e7d32", "narrow": "#26a69a", "packed": "#00796b", "int8": "#42a5f5", "int4": "#5c6bc0", "int2": "#ab47bc",
    "fp8": "#ffa726", "blpa8": "#8d6e63", "blpa4": "#6d4c41", "buffer": "#ffcc80",
}


def _family(codec: str) -> str:
    name = codec.split("(")[0].split("[")[0].split("+")[0].split(":")[0].split("/")[0]
    return name if name in _COLORS else "none"


@dataclasses.dataclass
class _Lane:
    label: str
    family: str
    nbytes: int
    spans: list[tuple[int, int]]
    module: str = ""  # dotted module path, what lanes are folded by


def timeline_dot(cm: "CompressedModule", *, max_lanes: int = 40, buckets: int = 48) -> str:
    """The DOT text of :func:`timeline`."""
    captures = cm.capture_log.captures()
    if not captures:
        raise NotCapturedError(
            "nothing captured yet: run one training-mode forward (model.train(), grad enabled) through the "
            "compiled module, then draw the timeline"
        )
    lines = [
        "digraph fxcompress_timeline {",
        '  graph [rankdir=TB, fontname="Helvetica", labelloc=t, '
        f'label="fxcompress memory timeline  {html.escape(cm.config.describe())}"];',
        '  node [shape=plaintext, fontname="Helvetica"];',
    ]
    previous = None
    for k, cap in enumerate(captures):
        for which, program in (("before", cap.before), ("after", cap.rewritten)):
            live = analyze_liveness(program, inductor=cm.backend is Backend.INDUCTOR)
            lanes = _saved_lanes(cap, program, live, which)
            lanes = _group(lanes, max_lanes)
            lanes += _buffer_lanes(live)
            name = f"{which}_{k}"
            title = f"{program.name}, {which} the rewrite: saved {format_bytes(live.saved_bytes)}, predicted peak {format_bytes(live.peak_bytes)}"
            lines.append(f"  {name} [label=<{_table(title, live, lanes, buckets)}>];")
            if previous:
                lines.append(f"  {previous} -> {name} [style=invis];")
            previous = name
    lines.append(f"  legend [label=<{_legend()}>];")
    lines.append(f"  {previous} -> legend [style=invis];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def timeline(cm: "CompressedModule", path: str, *, max_lanes: int = 40, buckets: int = 48) -> pathlib.Path:
    """Write the memory timeline of ``cm`` to ``path`` (``.dot``, ``.svg``, ``.png`` or ``.pdf``).

    Returns the path written: ``path`` itself, or the ``.dot`` beside it when
    Graphviz's ``dot`` is not installed (a warning then says how to render).
    """
    out = pathlib.Path(path)
    fmt = output_format(path)
    text = timeline_dot(cm, max_lanes=max_lanes, buckets=buckets)
    dot_path = out.with_suffix(".dot")
    dot_path.write_text(text)
    if fmt == "dot":
        return dot_path
    exe = shutil.which("dot")
    if exe is None:
        warnings.warn(
            f"Graphviz's 'dot' is not installed: wrote {dot_path}; render it with "
            f"'dot -T{fmt} {dot_path} -o {out}' after installing Graphviz (apt-get install graphviz)",
            stacklevel=2,
        )
        return dot_path
    done = subprocess.run([exe, f"-T{fmt}", str(dot_path), "-o", str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        raise FxCompressError(
            f"Graphviz's dot could not render {dot_path} as {fmt} (exit {done.returncode}): "
            f"{done.stderr.strip()[:500]}; the DOT file is kept: try another format (.svg), or render it "
            f"by hand with 'dot -T{fmt} {dot_path} -o {out}'"
        )
    return out


def output_format(path: str) -> str:
    """``svg`` for ``step.svg``; :class:`FxCompressError` for a path the timeline cannot write."""
    suffix = pathlib.Path(path).suffix
    if suffix.lower() not in (".dot", ".svg", ".png", ".pdf"):
        raise FxCompressError(f"timeline path {path!r}: unknown format {suffix!r}; use .dot, .svg, .png or .pdf")
    folder = pathlib.Path(path).parent
    if not folder.is_dir():
        raise FxCompressError(f"timeline path {path!r}: folder {str(folder)!r} does not exist; create it first")
    return suffix.lstrip(".").lower()


def _saved_lanes(cap, program, live: Liveness, which: str) -> list[_Lane]:
    from ..api import codec_label  # NB: api imports the passes this module builds on

    span_of = {r.node: (r.start, r.end) for r in live.ranges if r.saved}
    lanes: dict[str, _Lane] = {}
    for s in program.saved:
        if s.is_graph_input or s.fw_node not in span_of:
            continue
        src = cap.original.saved[s.source] if s.source is not None else s
        codec = "none" if which == "before" else codec_label(cap, src.index)
        module = src.module
        label = f"{module}  {src.name}" if module else src.name
        lane = lanes.setdefault(label, _Lane(label, _family(codec), 0, [], module))
        lane.nbytes += s.nbytes
        lane.spans.append(span_of[s.fw_node])
    return sorted(lanes.values(), key=lambda l: (min(a for a, _ in l.spans), l.label))


def _group(lanes: list[_Lane], max_lanes: int) -> list[_Lane]:
    """Fold lanes by module path, one level coarser at a time, until at most ``max_lanes`` remain.

    A folded lane is live where any member is and is coloured by its largest member.
    """
    depth = 4
    while len(lanes) > max_lanes and depth > 0:
        merged: dict[str, _Lane] = {}
        largest: dict[str, int] = {}
        for lane in lanes:
            key = ".".join(lane.module.split(".")[:depth]) or "(top)"
            m = merged.setdefault(key, _Lane(key, lane.family, 0, [], key))
            m.nbytes += lane.nbytes
            m.spans += lane.spans
            if lane.nbytes > largest.get(key, -1):  # a folded lane takes its largest member's colour
                largest[key], m.family = lane.nbytes, lane.family
        lanes = sorted(merged.values(), key=lambda l: (min(a for a, _ in l.spans), l.label))
        depth -= 1
    return lanes


def _buffer_lanes(live: Liveness) -> list[_Lane]:
    plan = plan_buffers(live)
    return [
        _Lane(f"buffer {i} ({len(b.occupants)} tensors)", "buffer", b.size, [(r.start, r.end) for r in b.occupants])
        for i, b in enumerate(plan.buffers)
    ]


def _table(title: str, live: Liveness, lanes: list[_Lane], buckets: int) -> str:
    steps = len(live.order)
    cols = max(1, min(buckets, steps))

    def col(step: int) -> int:
        return step * cols // steps

    per_col = [0] * cols
    for i, b in enumerate(live.live_bytes):
        per_col[col(i)] = max(per_col[col(i)], b)
    peak_col = col(live.peak_step)
    top = max(per_col) or 1
    fw_cols = {col(i) for i in range(live.num_forward)}
    rows = [f'<TR><TD COLSPAN="{cols + 2}" ALIGN="LEFT"><B>{html.escape(title)}</B></TD></TR>']
    phase = "".join(
        f'<TD BGCOLOR="{"#bbdefb" if c in fw_cols else "#ffe0b2"}" WIDTH="10" HEIGHT="10">{"P" if c == peak_col else ""}</TD>'
        for c in range(cols)
    )
    rows.append(f'<TR><TD ALIGN="RIGHT">forward | backward</TD>{phase}<TD ALIGN="LEFT">P = peak</TD></TR>')
    shade = "".join(
        f'<TD BGCOLOR="{_grey(per_col[c] / top)}" WIDTH="10" HEIGHT="14"></TD>' for c in range(cols)
    )
    rows.append(f'<TR><TD ALIGN="RIGHT">live bytes</TD>{shade}<TD ALIGN="LEFT">{format_bytes(live.peak_bytes)} peak</TD></TR>')
    for lane in lanes:
        on = [False] * cols
        for start, end in lane.spans:
            for c in range(col(start), col(end) + 1):
                on[c] = True
        color = _COLORS[lane.family]
        cells = "".join(f'<TD BGCOLOR="{color}" WIDTH="10"></TD>' if v else '<TD WIDTH="10"></TD>' for v in on)
        rows.append(
            f'<TR><TD ALIGN="RIGHT">{html.escape(lane.label)}</TD>{cells}'
            f'<TD ALIGN="LEFT">{format_bytes(lane.nbytes)}</TD></TR>'
        )
    return '<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" CELLPADDING="2">' + "".join(rows) + "</TABLE>"


def _grey(fraction: float) -> str:
    v = int(round(255 - 200 * max(0.0, min(1.0, fraction))))
    return f"#{v:02x}{v:02x}{v:02x}"


def _legend() -> str:
    cells = "".join(
        f'<TD BGCOLOR="{color}">{html.escape(name)}</TD>' for name, color in _COLORS.items()
    )
    return f'<TABLE BORDER="0" CELLBORDER="1" CELLSPACING="0" CELLPADDING="4"><TR><TD>codec</TD>{cells}</TR></TABLE>'
