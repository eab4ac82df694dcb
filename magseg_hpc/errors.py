"""The one exception type that reaches users.

Library code raises ``MagsegError`` with a one-line message that names the problem and the fix;
the CLI prints it as ``magseg-hpc: error: <message>`` and exits with status 2.
"""


class MagsegError(Exception):
    """A problem with the user's input or environment, explained in one line."""
