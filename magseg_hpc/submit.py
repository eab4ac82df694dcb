"""``python -m magseg_hpc.submit``: the entry point of the launcher.

The command line lives in :mod:`magseg_hpc.commands.submit`, the launcher in
:mod:`magseg_hpc.launch` (profiles, parameters, batch script, tasks, submission).
"""

from __future__ import annotations

import sys

from magseg_hpc.commands.submit import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
