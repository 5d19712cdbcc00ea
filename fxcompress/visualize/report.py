"""Plain-text rendering of a :class:`~fxcompress.ir.Report`."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..ir import Report

__all__ = ["format_bytes", "format_report"]


def format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def format_report(report: "Report") -> str:
    header = ("graph", "saved tensor", "op", "shape", "dtype", "codec", "before", "after", "why")
    lines = [
        (
            r.program,
            r.name,
            r.op,
            "x".join(map(str, r.shape)) or "scalar",
            r.dtype,
            r.codec,
            format_bytes(r.bytes_before),
            format_bytes(r.bytes_after),
            r.reason,
        )
        for r in report.rows
        if r.counted
    ]
    inputs = [r for r in report.rows if not r.counted]
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:{'>' if i in (6, 7) else '<'}{w}}}" for i, w in enumerate(widths[:-1])) + "  {}"
    out = [f"fxcompress report  {report.config}", fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*l) for l in lines]
    before, after = report.saved_bytes_before, report.saved_bytes_after
    ratio = f"{before / after:.2f}x smaller" if after else "nothing left saved"
    out.append("")
    out.append(f"saved for backward: {format_bytes(before)} -> {format_bytes(after)} ({ratio})")
    groups = report.by_codec()
    if groups:
        width = max(len(g[0]) for g in groups)
        out.append("by codec, most bytes after first:")
        out += [f"  {label:<{width}}  {n:4d} tensor{'s' if n != 1 else ' '}  {format_bytes(b):>11} -> {format_bytes(a):>11}"
                for label, n, b, a in groups]
    if inputs:
        total = sum(r.bytes_before for r in inputs)
        out.append(
            f"also saved, not counted: {len(inputs)} graph inputs (parameters, buffers, user inputs; "
            f"{format_bytes(total)}), kept alive by their owners"
        )
    if report.predicted_peak_bytes_before is not None:
        out.append(
            f"predicted step peak: {format_bytes(report.predicted_peak_bytes_before)} -> "
            f"{format_bytes(report.predicted_peak_bytes_after)}"
        )
    if report.forward_buffers is not None:
        out.append(
            f"forward transients: {format_bytes(report.forward_naive_bytes)} as separate tensors, "
            f"{format_bytes(report.forward_arena_bytes)} in {report.forward_buffers} shared buffers"
        )
    out += [f"note: {n}" for n in report.notes]
    if report.substitutions:
        out += ["", _format_substitutions(report)]
    return "\n".join(out)


def _format_substitutions(report: "Report") -> str:
    subs = report.substitutions
    li = report.learning_indicator or {}
    done = sum(s.aux is not None for s in subs)
    rule = "asa" if "learning_rule='asa'" in report.config else "ara"
    kind = "linear layers" if rule == "asa" else "convolution weight gradients"
    out = [f"learning rule {rule}: {done} of {len(subs)} {kind} read an auxiliary activation"]
    for s in subs:
        what = f"{s.real} -> {s.aux}" if s.aux is not None else f"{s.real} (kept)"
        indicator = f"  LI={li[s.layer]:.3f}" if s.layer in li else ""
        out.append(f"  {s.program}  {s.layer:<24} {what:<28} {s.reason}{indicator}")
    return "\n".join(out)
