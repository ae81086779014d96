"""Errors that cross the core/front boundary, importable from both sides without an upward arrow."""


class EngineDeadError(RuntimeError):
    """The engine core failed or stopped answering; its in-flight requests are not finished."""
