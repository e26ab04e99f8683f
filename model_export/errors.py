"""Errors the CLI reports as one line (no traceback unless --verbose)."""


class ExportError(Exception):
    """A user-facing failure: unknown model, bad weights, unwritable output, failed validation."""
