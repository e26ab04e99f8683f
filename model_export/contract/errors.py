"""The one error base both sides share: a failure the user can act on, reported as one line (no traceback)."""


class ContractError(Exception):
    """A user-facing failure: the exporter's `ExportError`, the engines' load errors, a file that breaks the contract."""
