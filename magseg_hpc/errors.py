"""The one exception type that reaches users.

Library code raises ``MagsegError`` with a one-line message that names the problem and the fix;
the CLI prints it as ``magseg-hpc: error: <message>`` and exits with status 2.
"""

import errno

# Environment problems (no permission, read-only or full disk): the CLI shows OSErrors with
# these codes as one line too, not a traceback.
USER_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT})


class MagsegError(Exception):
    """A problem with the user's input or environment, explained in one line."""
