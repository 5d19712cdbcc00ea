"""Human-readable views of what fxcompress planned: report tables (and, later, diagrams)."""
from .report import format_bytes, format_report

__all__ = ["format_bytes", "format_report"]
