"""The one exception type that reaches users.

Library code raises ``MagsegError`` with a one-line message that names the problem and the fix;
the CLI prints it as ``magseg-hpc: error: <message>`` and exits with status 2.
"""

import errno

# Environment problems (no permission, read-only or full disk): the CLI shows OSErrors with
# these codes as one line too, not a traceback.
USER_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT})

# Path problems the user fixes, with the fix: shown as one line too, wherever they surface.
ERRNO_FIXES = {
    errno.ENAMETOOLONG: "the name is longer than the file system allows; choose a shorter one",
    errno.ELOOP: "a symbolic link points back into itself; fix or remove the link",
}


def os_error_line(e: OSError) -> str | None:
    """One line (path, reason, fix) for an OSError that is the user's to fix, else None."""
    if e.errno in ERRNO_FIXES:
        fix = ERRNO_FIXES[e.errno]
    elif e.errno in USER_ERRNOS:
        fix = "check the permissions and free space"
    else:
        return None
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror}; {fix}"


class MagsegError(Exception):
    """A problem with the user's input or environment, explained in one line."""
