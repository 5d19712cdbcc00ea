"""Human-readable views of what fxcompress planned: report tables and the memory timeline."""
from .report import format_bytes, format_report
from .timeline import timeline, timeline_dot

__all__ = ["format_bytes", "format_report", "timeline", "timeline_dot"]
