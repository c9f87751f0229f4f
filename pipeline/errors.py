"""The one exception type for bad input, and the one-line wording of errors the CLI reports:
the CLI prints `attnseg: error: <line>` and exits 2."""

from __future__ import annotations

import errno
from contextlib import contextmanager


class UserError(Exception):
    """Bad input from the user (arguments, files, models): reported without a traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a scheduler's preemption) where a command stops as Ctrl-C
    stops it: what it holds is saved, and the CLI exits 143 (128 + SIGTERM)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def os_error_line(e: OSError) -> str:
    """One line for an OSError from the user's own disk or permissions: what failed, where,
    and what to do. Writes are atomic, so the same command run again resumes the job."""
    where = f" ({e.filename})" if e.filename else ""
    reason = e.strerror or first_line(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return (f"{reason}{where}: free some space, then run the same command again to "
                "resume (nothing half-written was kept)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{reason}{where}: choose a folder you can write to"
    return f"{reason}{where}"


@contextmanager
def naming_file(path):
    """Attach `path` to an OSError raised inside that names no file (a failed write() or
    fsync() does not), so the one-line report says where the disk was full."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise
