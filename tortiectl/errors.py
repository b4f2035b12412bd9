"""tortiectl's one user-facing error."""


class CliError(Exception):
    """A user-facing error: printed as `Error: ...`, exit status 1."""
