"""The three kinds of failure, and interruption, each with the exit code the command line documents."""


class SovpackError(Exception):
    """Base class: a failure with one precise, single-paragraph message."""

    exit_code = 3


class Refused(SovpackError):
    """A bundle, volume or file failed an integrity, signature, trust, policy or format check."""

    exit_code = 1


class UsageError(SovpackError):
    """The command was called wrongly: bad option, missing argument, wrong kind of path."""

    exit_code = 2


class Failure(SovpackError):
    """Anything else: I/O, network, a missing optional dependency."""

    exit_code = 3


class Interrupted(SovpackError):
    """Ctrl-C (or, where a command asks for it, SIGTERM) stopped the command."""

    exit_code = 130


class FormatError(Refused):
    """A file is not a well-formed instance of the format it claims (or it is a pickle)."""

    def __init__(self, path, detail: str):
        super().__init__(f"{path}: {detail}")
        self.path = path
        self.detail = detail
