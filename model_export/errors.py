"""Errors the CLI reports as one line (no traceback unless --verbose)."""

from model_export.contract.errors import ContractError


class ExportError(ContractError):
    """A user-facing failure: unknown model, bad weights, unwritable output, failed validation."""
