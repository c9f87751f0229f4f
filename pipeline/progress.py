"""Progress bars: every tqdm bar of the package is made here, so they behave alike.

On a terminal a bar redraws in place several times a second. On a stream that is not a terminal
(a log file, a pipe, a batch job's stderr) each redraw is more text in the log, so there a bar
redraws at most every `NON_TTY_INTERVAL_S` seconds: a long run writes a line every half
minute, not one or two per step.
"""

from __future__ import annotations

import sys

NON_TTY_INTERVAL_S = 30.0


def is_terminal(stream) -> bool:
    """Whether `stream` is an interactive terminal (False for files, pipes, StringIO)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(*, file=None, **kwargs):
    """A tqdm bar (`kwargs` as tqdm takes them) on `file` (default: stderr), redrawn rarely
    where that is not a terminal."""
    from tqdm import tqdm

    if not is_terminal(sys.stderr if file is None else file):
        kwargs.setdefault("mininterval", NON_TTY_INTERVAL_S)
        # tqdm forces a redraw every maxinterval seconds when it batches updates: not sooner.
        kwargs.setdefault("maxinterval", kwargs["mininterval"])
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(file=file, **kwargs)
