"""One exception type for every problem the user can fix.

Anything raised as `KbitError` is printed by the CLI as a single line (no traceback) and ends the process
with `exit_code` (2 = bad usage or input, 1 = failure). Messages name the file or tensor and say what to do.
"""


class KbitError(Exception):
    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def bad_input(message: str) -> KbitError:
    return KbitError(message, exit_code=2)


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, kill, docker stop), raised while kbit writes an output so that it cleans up exactly as
    for Ctrl-C (a KeyboardInterrupt); the CLI says which of the two it was."""
