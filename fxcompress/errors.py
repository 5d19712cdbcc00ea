"""Errors raised by fxcompress.

Every user-facing failure is an :class:`FxCompressError`; the subclasses say
which stage refused and their messages name the offending value and what is
accepted instead.
"""
from __future__ import annotations

__all__ = [
    "FxCompressError",
    "ConfigError",
    "CaptureError",
    "NotCapturedError",
    "UnsupportedError",
    "InternalError",
]


class FxCompressError(Exception):
    """Base class of every error fxcompress raises on purpose."""


class ConfigError(FxCompressError, ValueError):
    """A :class:`~fxcompress.CompressConfig` field has a value that is not accepted."""


class CaptureError(FxCompressError):
    """The model could not be captured as forward/backward graphs."""


class NotCapturedError(FxCompressError):
    """A report or diagram was asked for before anything was captured."""


class UnsupportedError(FxCompressError):
    """The request is valid but this version of fxcompress cannot carry it out."""


class InternalError(FxCompressError):
    """An invariant of fxcompress itself failed; please report it with the message."""
